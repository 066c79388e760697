"""Potentials and models whose landscapes are known exactly, and the exact references the tests compare with."""

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import EnergyLandscape
from lightning_landscape.energy import PathConfig, SamplingConfig

# Mueller & Brown (1979): sum_k A_k exp(a_k (x - x_k)^2 + b_k (x - x_k)(y - y_k) + c_k (y - y_k)^2)
A = [-200.0, -100.0, -170.0, 15.0]
a_ = [-1.0, -1.0, -6.5, 0.7]
b_ = [0.0, 0.0, 11.0, 0.6]
c_ = [-10.0, -10.0, -6.5, 0.7]
x0 = [1.0, 0.0, -0.5, -1.0]
y0 = [0.0, 0.5, 1.5, 1.0]
# the two deep minima, the intermediate one, and the two saddles between them (Mueller & Brown 1979)
MIN_A, MIN_B, MIN_C = (-0.558, 1.442, -146.70), (0.623, 0.028, -108.17), (-0.050, 0.467, -80.77)
SADDLE_1, SADDLE_2 = (-0.822, 0.624, -40.66), (0.212, 0.293, -72.25)


def mueller_brown(module, _batch):
    x, y = module.weight[0, 0], module.weight[0, 1]
    return sum(
        A[k] * torch.exp(a_[k] * (x - x0[k]) ** 2 + b_[k] * (x - x0[k]) * (y - y0[k]) + c_[k] * (y - y0[k]) ** 2)
        for k in range(4)
    )


def kinked_well(module, _batch):
    """``(x^2 - 1)^2 + |y - 0.3 (1 - x^2)|``: minima (+-1, 0) at loss 0 on a kink of the loss (the gradient does
    not vanish there, as at the minima of ReLU networks), the saddle (0, 0.3) at loss 1 on the kink too."""
    x, y = module.weight[0, 0], module.weight[0, 1]
    return (x**2 - 1) ** 2 + torch.abs(y - 0.3 * (1 - x**2))


def point(xy):
    return torch.tensor(xy[:2], dtype=torch.float64)


def smoluchowski_timescale(potential, temperature: float, lo: float = -2.2, hi: float = 2.2, n: int = 1200) -> float:
    """The slowest relaxation time of dx = -U'(x) dt + sqrt(2T) dW: -1/lambda_2 of its generator on a fine grid
    (square-root approximation, Lie, Fackeldey & Weber 2013: Q_ij = T/h^2 sqrt(pi_j / pi_i) between neighbours)."""
    x = np.linspace(lo, hi, n)
    h = x[1] - x[0]
    log_pi = -potential(x) / temperature
    q = np.zeros((n, n))
    for i in range(n - 1):
        q[i, i + 1] = temperature / h**2 * np.exp(0.5 * (log_pi[i + 1] - log_pi[i]))
        q[i + 1, i] = temperature / h**2 * np.exp(0.5 * (log_pi[i] - log_pi[i + 1]))
    q -= np.diag(q.sum(1))
    sym = np.exp(0.5 * log_pi)[:, None] * q * np.exp(-0.5 * log_pi)[None, :]  # similar, symmetric
    eigenvalues = np.sort(np.linalg.eigvalsh(0.5 * (sym + sym.T)))[::-1]
    return -1.0 / eigenvalues[1]


def smoluchowski_tpt_mfpt(potential, temperature: float, core: float, lo: float = -2.2, hi: float = 2.2) -> float:
    """The TPT mean first-passage time (1 / k_AB) of the same generator from the core x < -core to x > core."""
    x = np.linspace(lo, hi, 1500)
    h = x[1] - x[0]
    log_pi = -potential(x) / temperature
    n = len(x)
    q = np.zeros((n, n))
    for i in range(n - 1):
        q[i, i + 1] = temperature / h**2 * np.exp(0.5 * (log_pi[i + 1] - log_pi[i]))
        q[i + 1, i] = temperature / h**2 * np.exp(0.5 * (log_pi[i] - log_pi[i + 1]))
    q -= np.diag(q.sum(1))
    pi = np.exp(log_pi - log_pi.max())
    pi /= pi.sum()
    a, b = x < -core, x > core
    inner = ~(a | b)
    plus = np.zeros(n)
    plus[b] = 1.0
    plus[inner] = np.linalg.solve(q[np.ix_(inner, inner)], -q[np.ix_(inner, b)].sum(1))
    flux = (pi[a][:, None] * q[np.ix_(a, ~a)] * plus[~a][None, :]).sum()
    return float((pi * (1 - plus)).sum() / flux)


class DoubleWell(pl.LightningModule):
    """L(x, y) = (x^2 - 1)^2 / 2 + 2 y^2: minima (+-1, 0) at loss 0, the saddle (0, 0) at loss 1/2. The outputs are
    the parameters themselves, so the two minima are two different functions."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([-1.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.expand(len(x), 2)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return 0.5 * (self.w[0] ** 2 - 1) ** 2 + 2 * self.w[1] ** 2 + 0 * x.sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(64, 1)), batch_size=16)


def train(callbacks, root, model=None, max_steps=2, logger=None):
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=logger if logger is not None else CSVLogger(root),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(model or DoubleWell())
    return trainer


def well_energy(**overrides) -> EnergyLandscape:
    """SGLD replicas that hop the double well's barrier about ten times in all, and exact paths."""
    settings = dict(
        sampling=SamplingConfig(replicas=8, steps=1500, lr=0.01, temperature=0.5, record_every=5),
        paths=PathConfig(images=9, steps=400, step_size=0.02),
        basins={"merge_barrier": 0.1},  # below the barrier (0.5): two basins, joined by a computed path
        probe={"size": 16, "dtype": torch.float64},
    )
    return EnergyLandscape(**{**settings, **overrides})
