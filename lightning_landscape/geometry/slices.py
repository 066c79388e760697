"""Low-dimensional slices of the loss landscape, evaluated in batches of parameter vectors.

For a center ``theta`` and directions ``d_1..d_m`` (rows of ``D``), the slice at coordinates ``c`` is

    L(theta + c_1 d_1 + ... + c_m d_m),

a 1-D profile (m = 1), a 2-D plane (m = 2, Li et al. 2018) or a linear interpolation
``L((1 - t) theta_a + t theta_b)`` (Goodfellow, Vinyals & Saxe 2015) whose barrier is

    max_t L(theta_t) - max(L(theta_a), L(theta_b)).

Points are built and evaluated chunk by chunk (``Objective.losses``: ``vmap`` over parameter vectors), so
memory stays within ``memory_mb`` whatever the grid size. ``points`` restricts the evaluation to a subset
of the grid indices (how DDP ranks share a grid).

Example::

    >>> import torch
    >>> from lightning_landscape import Objective
    >>> quad = Objective(torch.nn.Linear(2, 1, bias=False), [torch.eye(2)],
    ...                  loss_fn=lambda m, A: 0.5 * (m.weight[0] @ A @ m.weight[0]))
    >>> center, d = torch.zeros(2), torch.tensor([[1.0, 0.0]])
    >>> evaluate_slice(quad, center, d, torch.tensor([[-2.0], [0.0], [2.0]])).tolist()  # 0.5 * a^2
    [2.0, 0.0, 2.0]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor


def evaluate_slice(
    objective: Any,
    center: Tensor,
    directions: Tensor,
    coords: Tensor,
    *,
    points: range | None = None,
    memory_mb: float = 64.0,
) -> Tensor:
    """``L(center + coords[i] @ directions)`` for each row ``i`` (of ``points``, default all).

    Args:
        objective: an :class:`~lightning_landscape.Objective`.
        center: (P,) the origin of the slice.
        directions: (m, P) the directions.
        coords: (N, m) the coordinates of the grid points.
        points: the grid indices to evaluate (a shard); default all.
        memory_mb: memory for the parameter vectors of one chunk.
    """
    dtype, device = objective.dtype, objective.device
    center = center.to(device=device, dtype=dtype)
    directions = directions.to(device=device, dtype=dtype).reshape(-1, center.numel())
    coords = coords.to(device=device, dtype=dtype).reshape(len(coords), directions.shape[0])
    index = torch.arange(len(coords)) if points is None else torch.arange(points.start, points.stop)
    per_chunk = max(1, int(memory_mb * 2**20 // (center.numel() * center.element_size())))
    out = []
    for start in range(0, len(index), per_chunk):
        chunk = coords[index[start : start + per_chunk]]
        out.append(objective.losses(center + chunk @ directions))
    return torch.cat(out) if out else torch.zeros(0, dtype=dtype, device=device)


def plane_coordinates(alphas: Tensor, betas: Tensor) -> Tensor:
    """The (len(betas) * len(alphas), 2) coordinates of a grid, row-major over ``betas`` then ``alphas``."""
    b, a = torch.meshgrid(betas, alphas, indexing="ij")
    return torch.stack([a.reshape(-1), b.reshape(-1)], dim=1)


@dataclass
class Interpolation:
    """Loss along ``(1 - t) theta_a + t theta_b``, the barrier, and whether BatchNorm was recomputed."""

    ts: np.ndarray
    losses: np.ndarray
    barrier: float
    recompute_bn: bool


def barrier(losses: np.ndarray | Tensor) -> float:
    """``max_t L_t - max(L_0, L_1)`` of a profile whose ends are the two points."""
    values = np.asarray(losses, dtype=float)
    return float(values.max() - max(values[0], values[-1]))


def interpolate(
    objective: Any,
    theta_a: Tensor,
    theta_b: Tensor,
    steps: int = 25,
    *,
    recompute_bn: bool = False,
    memory_mb: float = 64.0,
) -> Interpolation:
    """The loss profile and barrier of the straight line from ``theta_a`` to ``theta_b``.

    With ``recompute_bn`` the BatchNorm statistics are recomputed at every point on the probe set
    (:meth:`~lightning_landscape.Objective.batchnorm_statistics`) instead of using the module's.
    """
    if steps < 2:
        raise ValueError(f"`steps` must be at least 2, got {steps}.")
    ts = torch.linspace(0, 1, steps, dtype=torch.float64)
    direction = (theta_b - theta_a).unsqueeze(0)
    if recompute_bn:
        losses = []
        for t in ts:
            point = (theta_a + float(t) * direction[0]).to(objective.dtype)
            losses.append(float(objective.loss(point, objective.batchnorm_statistics(point))))
        values = np.asarray(losses)
    else:
        values = evaluate_slice(objective, theta_a, direction, ts[:, None], memory_mb=memory_mb).double().cpu().numpy()
    return Interpolation(ts.numpy(), values, barrier(values), recompute_bn)


def nonconvexity_map(
    objective: Any, center: Tensor, directions: Tensor, coords: Tensor, tol: float = 1e-2
) -> np.ndarray:
    """``|lambda_min / lambda_max|`` of the Hessian at each grid point (Li et al. 2018, sec. 6): near 0 the
    landscape is locally convex, large values mean strong negative curvature."""
    from lightning_landscape.curvature import hessian_eigenvalues

    out = []
    for c in coords.to(center):
        theta = center + c @ directions.to(center)
        top = float(hessian_eigenvalues(objective, tol=tol, theta=theta, method="lanczos").eigenvalues[0])
        low = float(
            hessian_eigenvalues(objective, which="smallest", tol=tol, theta=theta, method="lanczos").eigenvalues[0]
        )
        out.append(abs(low / top) if top != 0 else float("inf"))
    return np.asarray(out)
