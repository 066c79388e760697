"""Spectral density of the Hessian by stochastic Lanczos quadrature (SLQ).

Ghorbani, Krishnan & Xiao (2019), "An Investigation into Neural Net Optimization via Hessian Eigenvalue
Density"; Ubaru, Chen & Saad (2017). For a random unit vector ``v`` the spectral measure
``mu_v = sum_i (v^T u_i)^2 delta(lambda_i)`` has ``E_v[mu_v] = (1/d) sum_i delta(lambda_i)``, the eigenvalue
density. ``m`` Lanczos steps from ``v`` give the Gauss quadrature of ``mu_v``: nodes ``theta_j`` (the Ritz
values) and weights ``w_j = (e_1^T y_j)^2`` (squared first components of the eigenvectors of ``T``),
exact for polynomials of degree ``<= 2m - 1``:

    sum_j w_j theta_j^k = v^T H^k v,   k <= 2m - 1.

The density is the average over ``n_vectors`` vectors, smoothed with a Gaussian kernel of width ``sigma``:

    phi(t) = (1 / n_vectors) sum_l sum_j w_lj N(t; theta_lj, sigma^2).

Example::

    >>> import torch
    >>> from lightning_landscape import Objective
    >>> A = torch.diag(torch.tensor([1.0, 1.0, 5.0]))
    >>> quad = Objective(torch.nn.Linear(3, 1, bias=False), [A],
    ...                  loss_fn=lambda m, A: 0.5 * (m.weight[0] @ A @ m.weight[0]))
    >>> density = spectral_density(quad, n_vectors=50, n_steps=3)
    >>> round(density.moment(1), 1)  # tr(H) / d = 7 / 3
    2.3
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lightning_landscape.budget import time_up
from lightning_landscape.curvature.lanczos import lanczos_tridiagonal, tridiagonal_eigh
from lightning_landscape.curvature.operator import HessianOperator
from lightning_landscape.objective import Energy


@dataclass
class SpectralDensity:
    """SLQ nodes and weights (one row per random vector; rows padded with zero weight), and the smoothed
    density on ``grid``."""

    nodes: np.ndarray
    weights: np.ndarray
    grid: np.ndarray
    density: np.ndarray
    sigma: float
    n_hvp: int

    def moment(self, k: int) -> float:
        """Estimate of ``tr(H^k) / d``: the mean over vectors of ``sum_j w_j theta_j^k``."""
        return float(np.mean(np.sum(self.weights * self.nodes**k, axis=1)))


def spectral_density(
    objective: Energy,
    n_vectors: int = 5,
    n_steps: int = 60,
    *,
    grid_size: int = 400,
    sigma: float | None = None,
    theta: Tensor | None = None,
    params: Sequence[str] | None = None,
    seed: int = 0,
) -> SpectralDensity:
    """SLQ with ``n_vectors`` Rademacher start vectors and ``n_steps`` Lanczos steps each.

    Args:
        objective: an :class:`~lightning_landscape.Objective` (or a sharded one).
        n_vectors: number of random start vectors (averaged).
        n_steps: Lanczos steps per vector (quadrature nodes).
        grid_size: points of the density grid.
        sigma: kernel width; default 1% of the spectral range.
        theta: the point; params: parameter subset by name patterns; seed: seed of the vectors.
    """
    if n_vectors < 1 or n_steps < 1:
        raise ValueError(f"`n_vectors` and `n_steps` must be positive, got {n_vectors} and {n_steps}.")
    op = HessianOperator(objective, theta, params)
    g = torch.Generator().manual_seed(seed)
    nodes = np.zeros((n_vectors, n_steps))
    weights = np.zeros((n_vectors, n_steps))
    for i in range(n_vectors):
        if i and time_up():  # the analysis' budget: the vectors so far (their weights average below)
            nodes, weights = nodes[:i], weights[:i]
            break
        v = (torch.randint(0, 2, (op.dim,), generator=g) * 2 - 1).to(device=op.device, dtype=op.dtype)
        alpha, beta, _ = lanczos_tridiagonal(op.matvec, v, n_steps)
        vals, vecs = tridiagonal_eigh(alpha, beta)
        m = len(vals)
        nodes[i, :m] = vals.double().cpu().numpy()
        weights[i, :m] = (vecs[0] ** 2).double().cpu().numpy()
    used = weights > 0
    lo, hi = float(nodes[used].min()), float(nodes[used].max())
    width = sigma if sigma is not None else max(0.01 * (hi - lo), 1e-6 * max(abs(hi), 1.0))
    grid = np.linspace(lo - 5 * width, hi + 5 * width, grid_size)
    kernel = np.exp(-0.5 * ((grid[None, None, :] - nodes[..., None]) / width) ** 2) / (width * math.sqrt(2 * math.pi))
    density = np.mean(np.sum(weights[..., None] * kernel, axis=1), axis=0)
    return SpectralDensity(nodes, weights, grid, density, width, op.n_products)
