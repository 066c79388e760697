"""Extreme eigenvalues of the Hessian: implicitly restarted Lanczos (ARPACK), plain Lanczos, power iteration.

``hessian_eigenvalues(objective, k, which)`` returns the ``k`` largest (algebraic) or smallest eigenvalues
of ``H = d^2 L / d theta^2`` at ``theta`` using only Hessian-vector products:

* ``method="lanczos"`` (default, the fastest in ``scripts/bench_curvature.py``):
  :func:`~lightning_landscape.curvature.lanczos.lanczos_tridiagonal` with full reorthogonalization, grown for at
  least ``max(2k + 8, 12)`` steps and until every wanted Ritz pair ``(theta_i, y_i)`` has the residual
  ``r_i = |H Q y_i - theta_i Q y_i| = beta_m |e_m^T y_i| <= tol max(|theta_i|, 1e-3 |theta|_max)``. For a symmetric
  ``H`` some eigenvalue lies within ``r_i`` of ``theta_i`` (Parlett, *The Symmetric Eigenvalue Problem*, 4.5), so
  ``tol`` bounds the relative error; the minimum Krylov dimension keeps a close pair of top eigenvalues from being
  mistaken for one (the earlier stop rule, two consecutive Ritz values within ``tol``, returned ``lambda_2`` as
  ``lambda_max`` on a digits MLP).
* ``method="arpack"``: scipy's ``eigsh`` (ARPACK's implicitly restarted Lanczos, Lehoucq, Sorensen & Yang 1998)
  on a ``LinearOperator``; ``tol`` is ARPACK's relative accuracy of the Ritz values.
* ``method="power"``: power iteration with deflation, as in PyHessian (Yao et al. 2020): finds the
  eigenvalues of largest *magnitude*; kept for comparison (it needs many more products). It stops on the same
  residual as Lanczos, ``|H v - theta v| <= tol |theta|`` (so some eigenvalue lies within ``tol |theta|`` of
  ``theta``), not on the change of the Rayleigh quotient, which stalls far from the answer when the top two
  eigenvalues are close (PyHessian's rule said "converged" 3% off for a pair 1.00/0.97).

Smallest eigenvalues (``which="smallest"``) reveal negative curvature: a saddle, not a minimum.

Example::

    >>> import torch
    >>> from lightning_landscape import Objective
    >>> A = torch.diag(torch.tensor([3.0, -1.0, 0.5]))
    >>> quad = Objective(torch.nn.Linear(3, 1, bias=False), [A],
    ...                  loss_fn=lambda m, A: 0.5 * (m.weight[0] @ A @ m.weight[0]))
    >>> hessian_eigenvalues(quad, k=1).eigenvalues.round(decimals=4).tolist()
    [3.0]
    >>> hessian_eigenvalues(quad, k=1, which="smallest").eigenvalues.round(decimals=4).tolist()
    [-1.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import Tensor

from lightning_landscape.budget import time_up
from lightning_landscape.curvature.lanczos import lanczos_tridiagonal, tridiagonal_eigh
from lightning_landscape.curvature.operator import HessianOperator
from lightning_landscape.objective import Energy


@dataclass
class EigenResult:
    """Eigenvalues (descending for "largest", ascending for "smallest"), optional eigenvectors (dim, k),
    the number of Hessian-vector products used, and whether the method converged."""

    eigenvalues: Tensor
    eigenvectors: Tensor | None
    n_hvp: int
    converged: bool
    method: str


def _start_vector(dim: int, seed: int, like: Tensor) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dim, generator=g, dtype=torch.float64).to(device=like.device, dtype=like.dtype)


def _arpack(op: HessianOperator, k: int, which: str, tol: float, max_iter: int | None, seed: int) -> tuple:
    def mv(x: np.ndarray) -> np.ndarray:
        v = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(-1))
        return op.matvec(v).detach().cpu().double().numpy()

    linop = LinearOperator((op.dim, op.dim), matvec=mv, dtype=np.float64)
    v0 = _start_vector(op.dim, seed, torch.zeros((), dtype=torch.float64)).numpy()
    vals, vecs = eigsh(linop, k=k, which="LA" if which == "largest" else "SA", tol=tol, v0=v0, maxiter=max_iter)
    order = np.argsort(-vals if which == "largest" else vals)
    return torch.from_numpy(vals[order].copy()), torch.from_numpy(vecs[:, order].copy()), True


def _lanczos(op: HessianOperator, k: int, which: str, tol: float, max_iter: int | None, seed: int) -> tuple:
    def wanted(alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
        vals, vecs = tridiagonal_eigh(alpha, beta)
        idx = torch.arange(len(vals) - 1, len(vals) - 1 - k, -1) if which == "largest" else torch.arange(k)
        return vals[idx], vecs[:, idx]

    min_steps = max(2 * k + 8, 12)

    def converged(alpha: Tensor, beta: Tensor, beta_next: Tensor) -> bool:
        if len(alpha) < min_steps:
            return False
        vals = torch.linalg.eigvalsh(torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1))
        ritz, y = wanted(alpha, beta)
        residual = beta_next.abs() * y[-1].abs()
        scale = torch.maximum(ritz.abs(), 1e-3 * vals.abs().max())
        return bool((residual <= tol * scale).all())

    steps = min(op.dim, max_iter or 300)
    v0 = _start_vector(op.dim, seed, op.theta)
    info: dict = {}
    alpha, beta, basis = lanczos_tridiagonal(
        op.matvec, v0, steps, stop=converged, check_every=1, info=info, restart=True
    )
    ritz, vecs = wanted(alpha, beta)
    ok = info["stopped"] == "stop" or len(alpha) == op.dim  # not at the step or memory cap
    return ritz.cpu().double(), (basis @ vecs).cpu().double(), ok


def power_iteration(
    op: HessianOperator, k: int = 1, tol: float = 1e-3, max_iter: int = 1000, seed: int = 0
) -> tuple[Tensor, Tensor, bool]:
    """Top-``k`` eigenvalues by magnitude with deflation (Gram-Schmidt against the found vectors), each converged
    when its residual ``|H v - theta v|`` is at most ``tol |theta|``."""
    found_vals: list[Tensor] = []
    found_vecs: list[Tensor] = []
    converged = True
    for i in range(k):
        v = _start_vector(op.dim, seed + i, op.theta)
        v = v / v.norm()
        eig = torch.zeros((), dtype=v.dtype, device=v.device)
        for iteration in range(max_iter):
            if iteration and time_up():  # the analysis' budget: this estimate, unconverged
                converged = False
                break
            for u in found_vecs:
                v = v - torch.dot(u, v) * u
            v = v / v.norm()
            hv = op.matvec(v)
            for u in found_vecs:  # the deflated operator
                hv = hv - torch.dot(u, hv) * u
            eig = torch.dot(v, hv)
            if float((hv - eig * v).norm()) <= tol * abs(float(eig)) or float(hv.norm()) == 0.0:
                break
            v = hv / hv.norm()
        else:
            converged = False
        found_vals.append(eig)
        found_vecs.append(v)
    return torch.stack(found_vals).cpu().double(), torch.stack(found_vecs, 1).cpu().double(), converged


def hessian_eigenvalues(
    objective: Energy,
    k: int = 1,
    which: Literal["largest", "smallest"] = "largest",
    tol: float = 1e-3,
    max_iter: int | None = None,
    *,
    method: Literal["arpack", "lanczos", "power"] = "lanczos",
    theta: Tensor | None = None,
    params: Sequence[str] | None = None,
    return_eigenvectors: bool = False,
    seed: int = 0,
) -> EigenResult:
    """The ``k`` largest or smallest Hessian eigenvalues of ``objective`` at ``theta``.

    Args:
        objective: an :class:`~lightning_landscape.Objective` (or a sharded one under DDP).
        k: how many eigenvalues.
        which: ``"largest"`` or ``"smallest"`` (algebraic).
        tol: relative accuracy of the eigenvalues.
        max_iter: iteration cap (ARPACK restarts, Lanczos steps, or power iterations per eigenvalue).
        method: ``"lanczos"`` (default), ``"arpack"`` or ``"power"`` (largest magnitude; comparison only).
        theta: the point (default: the module's current parameters).
        params: restrict to the parameters matching these name patterns (per-layer curvature).
        return_eigenvectors: also return the eigenvectors (as columns, float64).
        seed: seed of the start vector.

    Raises:
        ValueError: for ``k`` out of range, an unknown ``which`` or ``method``.
    """
    if which not in ("largest", "smallest"):
        raise ValueError(f"`which` must be 'largest' or 'smallest', got {which!r}.")
    if method not in ("arpack", "lanczos", "power"):
        raise ValueError(f"`method` must be 'arpack', 'lanczos' or 'power', got {method!r}.")
    op = HessianOperator(objective, theta, params)
    if not 1 <= k < op.dim:
        raise ValueError(f"`k` must be in [1, {op.dim - 1}] for a {op.dim}-dimensional Hessian, got {k}.")
    if method == "power":
        if which != "largest":
            raise ValueError("Power iteration finds the largest-magnitude eigenvalues only. HINT: method='lanczos'.")
        vals, vecs, ok = power_iteration(op, k, tol, max_iter or 1000, seed)
    elif method == "lanczos":
        vals, vecs, ok = _lanczos(op, k, which, tol, max_iter, seed)
    else:
        vals, vecs, ok = _arpack(op, k, which, tol, max_iter, seed)
    return EigenResult(vals, vecs if return_eigenvectors else None, op.n_products, ok, method)
