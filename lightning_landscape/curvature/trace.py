"""Trace of the Hessian: Hutchinson's estimator and Hutch++.

Hutchinson (1989): for Rademacher vectors ``z`` (entries +-1), ``E[z^T H z] = tr(H)``; with ``m`` samples the
estimate is their mean and its standard error ``std / sqrt(m)``.

Hutch++ (Meyer, Musco, Musco & Woodruff 2021, "Hutch++: Optimal Stochastic Trace Estimation"): spend ``m/3``
products on a sketch ``Q = orth(H S)`` of the dominant range, ``m/3`` on its exact part ``tr(Q^T H Q)``
and ``m/3`` on Hutchinson for the rest, ``tr((I - QQ^T) H (I - QQ^T))``. For Hessians with a few large
eigenvalues (the usual case for trained networks) the error falls like ``1/m`` instead of ``1/sqrt(m)``.
The reported standard error is that of the Hutchinson part (the sketch part is exact given ``Q``), from the
``n`` samples of that part (``n = m - 2 floor(m/3)``: 5 at ``m = 15``). With so few samples, plus or minus two
standard errors covers far less than 95%; :attr:`TraceResult.interval` is the Student-t interval with ``n - 1``
degrees of freedom, ``estimate +- t_{0.975, n-1} s.e.``, which has its nominal coverage at every ``m``.

Written here (not curvlinops' ``hutchpp_trace``) so that the products go through our objective, which
may be sharded over DDP ranks, and so that the standard error is returned.

Example::

    >>> import torch
    >>> from lightning_landscape import Objective
    >>> A = torch.diag(torch.arange(1.0, 7.0))
    >>> quad = Objective(torch.nn.Linear(6, 1, bias=False), [A],
    ...                  loss_fn=lambda m, A: 0.5 * (m.weight[0] @ A @ m.weight[0]))
    >>> r = hessian_trace(quad, n_samples=18, method="hutch++")  # rank 6 <= 18/3: exact
    >>> round(r.estimate, 4), r.n_hvp
    (21.0, 18)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_landscape.budget import time_up
from lightning_landscape.curvature.operator import HessianOperator
from lightning_landscape.objective import Energy


@dataclass
class TraceResult:
    """Trace estimate, its standard error, the Hessian-vector products used, the method, and the number of
    random samples the standard error rests on."""

    estimate: float
    std_error: float
    n_hvp: int
    method: str
    n_random: int = 0

    def interval(self, level: float = 0.95) -> tuple[float, float]:
        """The Student-t confidence interval ``estimate +- t_{(1+level)/2, n-1} std_error``."""
        from scipy.stats import t

        if self.n_random < 2:
            return -math.inf, math.inf
        half = float(t.ppf(0.5 + level / 2, self.n_random - 1)) * self.std_error
        return self.estimate - half, self.estimate + half


def rademacher(dim: int, n: int, generator: torch.Generator, like: Tensor) -> Tensor:
    """``(dim, n)`` matrix of independent +-1 entries (drawn on the CPU with ``generator``)."""
    signs = torch.randint(0, 2, (dim, n), generator=generator).mul_(2).sub_(1)
    return signs.to(device=like.device, dtype=like.dtype)


def _mean_and_error(samples: Tensor) -> tuple[float, float]:
    mean = float(samples.mean())
    error = float(samples.std(unbiased=True)) / math.sqrt(len(samples)) if len(samples) > 1 else float("inf")
    return mean, error


def _samples(op: HessianOperator, n: int, generator: torch.Generator, Q: Tensor | None = None) -> Tensor:
    """``z^T H z`` for ``n`` Rademacher vectors ``z`` (drawn one at a time; projected off ``Q`` when given), fewer
    (at least 2) once the analysis' budget is spent (:func:`lightning_landscape.budget.time_up`): the standard
    error then grows with the missing samples."""
    samples = []
    for _ in range(n):
        if len(samples) >= 2 and time_up():
            break
        z = rademacher(op.dim, 1, generator, op.theta)[:, 0]
        if Q is not None:
            z = z - Q @ (Q.T @ z)
        samples.append(torch.dot(z, op.matvec(z)))
    return torch.stack(samples)


def hessian_trace(
    objective: Energy,
    n_samples: int = 30,
    method: Literal["hutch++", "hutchinson"] = "hutch++",
    *,
    theta: Tensor | None = None,
    params: Sequence[str] | None = None,
    seed: int = 0,
) -> TraceResult:
    """Estimate ``tr(H)`` with ``n_samples`` Hessian-vector products.

    Args:
        objective: an :class:`~lightning_landscape.Objective` (or a sharded one).
        n_samples: Hessian-vector products to spend (Hutch++ needs at least 3).
        method: ``"hutch++"`` or ``"hutchinson"``.
        theta: the point (default: current parameters).
        params: restrict to a parameter subset by name patterns (per-layer trace).
        seed: seed of the random vectors.
    """
    if method not in ("hutch++", "hutchinson"):
        raise ValueError(f"`method` must be 'hutch++' or 'hutchinson', got {method!r}.")
    if n_samples < (3 if method == "hutch++" else 1):
        raise ValueError(
            f"`n_samples` must be at least {3 if method == 'hutch++' else 1} for {method}, got {n_samples}."
        )
    op = HessianOperator(objective, theta, params)
    g = torch.Generator().manual_seed(seed)
    if method == "hutchinson":
        samples = _samples(op, n_samples, g)
        mean, error = _mean_and_error(samples)
        return TraceResult(mean, error, op.n_products, method, len(samples))
    k = n_samples // 3
    Q, _ = torch.linalg.qr(op.matmat(rademacher(op.dim, k, g, op.theta)))
    sketched = float(torch.trace(Q.T @ op.matmat(Q)))
    samples = _samples(op, n_samples - 2 * k, g, Q)
    mean, error = _mean_and_error(samples)
    return TraceResult(sketched + mean, error, op.n_products, method, len(samples))
