"""Basin sampling: replicas of SGD or SGLD from the current point, and the noise they cross barriers with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_landscape.budget import time_up
from lightning_landscape.dynamics.excursions import Excursions, sample_basin
from lightning_landscape.dynamics.sketch import SparseProjection
from lightning_landscape.energy.configs import SamplingConfig

if TYPE_CHECKING:
    from lightning_landscape.objective import Objective


def sample(
    pool: Objective,
    theta: Tensor,
    config: SamplingConfig,
    lr: float,
    *,
    replicas: list[int] | None = None,
    seed_offset: int = 0,
    sketch: SparseProjection | None = None,
    probe: Objective | None = None,
    starts: Tensor | None = None,
    momentum: float = 0.0,
) -> Excursions:
    """Replicas ``replicas`` (default: all of ``config.replicas``) from ``theta`` on the minibatch pool ``pool``, seeded
    ``config.seed + seed_offset`` (e.g. the step, so that triggers differ), with probe outputs when ``probe``;
    ``starts`` ``(config.replicas, P)``: a start per replica id instead (:func:`restart_points`); ``lr`` and
    ``momentum``: the step rule (``config``'s, resolved against training's)."""
    ids = list(range(config.replicas)) if replicas is None else replicas
    return sample_basin(
        pool,
        theta if starts is None else starts[ids].to(theta),
        ids,
        config.steps,
        lr,
        config.temperature,
        seed=config.seed + seed_offset,
        sketch=sketch,
        record_every=config.record_every,
        probe=probe,
        momentum=momentum,
    )


@dataclass
class CrossingNoise:
    """The replicas' noise per direction (see the module docstring): the centred minibatch gradients of the pool at
    one point, and the step rule. ``B x P`` floats on the host.

    Example (minibatch gradients that differ only along ``y``: no noise along ``x``)::

        >>> import torch
        >>> noise = CrossingNoise(torch.tensor([[0.0, 1.0], [0.0, -1.0]]), lr=0.1, temperature=0.0)
        >>> noise.along(torch.tensor([1.0, 0.0])), noise.along(torch.tensor([0.0, 1.0])), noise.level
        (0.0, 0.1, 0.05)
    """

    grads: Tensor
    lr: float
    temperature: float
    momentum: float = 0.0

    @classmethod
    def measure(
        cls, pool: Objective, theta: Tensor, lr: float, temperature: float, momentum: float = 0.0
    ) -> CrossingNoise:
        """The gradients of every batch of ``pool`` at ``theta`` (one gradient pass per batch), centred."""
        if len(pool.batches) < 2:
            return cls(torch.zeros(0, pool.numel), lr, float(temperature), momentum)
        grads = []
        for b in range(len(pool.batches)):  # fewer batches (at least 2) once the analysis' budget is spent
            if len(grads) >= 2 and time_up():
                break
            grads.append(pool.loss_and_grad(theta, batch=b)[1])
        grads = torch.stack(grads)
        return cls((grads - grads.mean(0)).double().cpu(), lr, float(temperature), momentum)

    def _spread(self, squares: Tensor) -> float:
        return float(squares.sum()) / (len(self.grads) - 1) if len(self.grads) > 1 else 0.0

    @property
    def level(self) -> float:
        """``T + lr tr(Sigma_B) / (4 (1 - beta))``: the noise level (the unbiased spread over the batches)."""
        return self.temperature + self.lr * self._spread(self.grads**2) / (4 * (1 - self.momentum))

    def along(self, direction: Tensor) -> float:
        """``T + lr s_d / (2 (1 - beta))`` along the unit vector ``direction``."""
        d = direction.detach().cpu().to(self.grads.dtype)
        return self.temperature + self.lr * self._spread((self.grads @ d) ** 2) / (2 * (1 - self.momentum))

    def between(self, a: Tensor, b: Tensor) -> float:
        """The temperature along the straight line from ``a`` to ``b`` (``T`` where they coincide)."""
        d = (b - a).detach().double().cpu()
        return self.along(d / d.norm()) if float(d.norm()) > 0 else self.temperature


def noise_level(pool: Objective, theta: Tensor, lr: float, temperature: float, momentum: float = 0.0) -> float:
    """``T + lr tr(Sigma_B) / (4 (1 - momentum))``, the replicas' noise level in loss units (see the module
    docstring); ``tr(Sigma_B)`` from the gradients of the pool's batches at ``theta`` (unbiased over batches)."""
    return CrossingNoise.measure(pool, theta, lr, temperature, momentum).level


def merge_level(merge_barrier: float | None, noise: CrossingNoise | None, a: Tensor, b: Tensor) -> float:
    """The merge level of the pair ``a``, ``b``: ``merge_barrier`` when fixed, else the noise along the line between
    them (``noise.between``), else 0."""
    if merge_barrier is not None:
        return float(merge_barrier)
    return noise.between(a, b) if noise is not None else 0.0
