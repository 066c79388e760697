"""FlatnessMonitor on a 20M-parameter model (one 4472 x 4472 linear layer), with the free memory reported as room for
``VECTORS`` parameter vectors in half of it: the Lanczos basis stops at that cap instead of growing to 30 vectors.

Usage: python memory.py OUT.json VECTORS
Writes the peak resident memory above a plain training step of the same model, in parameter vectors.
"""

import resource
import sys
from pathlib import Path

import lightning_landscape  # noqa: F401  (first)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import json

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_landscape.curvature.memory as memory
from lightning_landscape import FlatnessMonitor


class Wide(pl.LightningModule):
    def __init__(self, width: int = 4472) -> None:
        super().__init__()
        self.net = nn.Linear(width, width)
        self.width = width

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(torch.tanh(self.net(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(4, self.width, generator=g), torch.randn(4, self.width, generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=2)


def trainer(callbacks):
    return pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


if __name__ == "__main__":
    out, vectors = sys.argv[1], int(sys.argv[2])
    model = Wide()
    n = sum(p.numel() for p in model.parameters())
    trainer([]).fit(Wide())  # the baseline: a plain training step of the same model
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    memory.free_bytes = lambda device: 2 * vectors * n * 4  # half of it holds `vectors` float32 vectors
    monitor = FlatnessMonitor(
        every_n_steps=1, at_fit_end=False, measures=["lambda_max"], progress=False, probe={"size": 2}
    )
    trainer([monitor]).fit(model)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    record = monitor.history[-1]
    result = {"n_params": n, "extra_vectors": (peak - base) / (4 * n), "n_hvp": record["n_hvp"]}
    result["lambda_max"] = record["lambda_max"]
    Path(out).write_text(json.dumps(result))
