"""The Lanczos process with full reorthogonalization, on Hessian-vector products.

Starting from a unit vector ``q_1``, ``m`` steps build an orthonormal basis ``Q = [q_1 ... q_m]`` of the
Krylov space ``span{q_1, H q_1, ..., H^{m-1} q_1}`` and the tridiagonal ``T = Q^T H Q`` with diagonal
``alpha`` and off-diagonal ``beta``:

    w = H q_j - beta_{j-1} q_{j-1},  alpha_j = q_j^T w,  w <- w - alpha_j q_j,
    w <- w - Q (Q^T w)   (full reorthogonalization, twice),  beta_j = |w|,  q_{j+1} = w / beta_j.

The eigenvalues of ``T`` (Ritz values) approximate the extreme eigenvalues of ``H`` (Lanczos 1950; Golub &
Van Loan, ch. 10), and the squared first components of its eigenvectors are the Gauss quadrature weights
of stochastic Lanczos quadrature (:mod:`lightning_landscape.curvature.slq`).

Written here rather than taken from a library because SLQ needs ``T`` itself (scipy's ``eigsh`` does not
expose it) and because the basis stays in torch, on the model's device.

Example::

    >>> import torch
    >>> H = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    >>> alpha, beta, _ = lanczos_tridiagonal(lambda v: H @ v, torch.ones(4, dtype=torch.float64), 4)
    >>> T = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    >>> torch.linalg.eigvalsh(T).round(decimals=6).tolist()
    [1.0, 2.0, 3.0, 4.0]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_landscape.budget import time_up
from lightning_landscape.curvature.memory import vectors_that_fit


def lanczos_tridiagonal(
    matvec: Callable[[Tensor], Tensor],
    v0: Tensor,
    steps: int,
    reorthogonalize: bool = True,
    stop: Callable[[Tensor, Tensor, Tensor], bool] | None = None,
    check_every: int = 5,
    max_vectors: int | None = None,
    info: dict | None = None,
    restart: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Up to ``steps`` Lanczos steps from ``v0``: returns ``alpha`` (m,), ``beta`` (m-1,) and the basis (dim, m).

    Stops early when the Krylov space is exhausted (``beta ~ 0``), when ``stop(alpha, beta, beta_next)`` (asked
    every ``check_every`` steps with the current tridiagonal and the norm of the next Lanczos vector, which gives
    the Ritz residuals ``|H Q y - theta Q y| = beta_next |y_m|``) returns True, or when the basis, with the copy
    that growing it takes, would hold more than ``max_vectors`` vectors (default: half of the free memory,
    :func:`~lightning_landscape.curvature.memory.vectors_that_fit`). ``info``, when given, gets ``"stopped"``:
    ``"stop"``, ``"exhausted"``, ``"memory"``, ``"time"`` (the deadline of :func:`lightning_landscape.budget.deadline`,
    checked before each step after the second) or ``"steps"``.

    With ``restart=True`` an exhausted Krylov space (an invariant subspace, e.g. ``H = 0`` for a loss linear in the
    parameters) does not stop the process: it goes on from a random vector orthogonal to the basis, with a zero
    off-diagonal entry (``T`` becomes block diagonal), so that ``k`` eigenvalues can be asked for whatever the
    start vector. Stochastic Lanczos quadrature keeps the default: for it an exhausted space is an exact answer.
    """
    info = {} if info is None else info
    info["stopped"] = "steps"
    dim = v0.numel()
    steps = min(steps, dim)
    budget = max_vectors if max_vectors is not None else vectors_that_fit(dim, v0.dtype, v0.device)
    rows = torch.empty(max(1, min(steps, 32, budget)), dim, dtype=v0.dtype, device=v0.device)  # q_j; grown by doubling
    alphas, betas = [], []
    q = v0 / v0.norm()
    beta = torch.zeros((), dtype=v0.dtype, device=v0.device)
    for j in range(steps):
        if j >= 2 and time_up():  # the analysis' budget (lightning_landscape.budget.deadline): what we have
            betas.pop()
            info["stopped"] = "time"
            break
        if j == rows.shape[0]:
            grow = min(j, steps - j, budget - 2 * j)  # the copy holds old and new rows at once
            if grow < 1:  # the memory cap: an unconverged result, not a failed allocation
                betas.pop()  # the next vector is not kept
                info["stopped"] = "memory"
                break
            rows = torch.cat([rows, torch.empty_like(rows[:grow])])
        rows[j] = q
        w = matvec(q)
        if j > 0:
            w = w - beta * rows[j - 1]
        alpha = torch.dot(q, w)
        w = w - alpha * q
        if reorthogonalize:
            for _ in range(2):
                w = w - (rows[: j + 1] @ w) @ rows[: j + 1]
        alphas.append(alpha)
        if j == steps - 1:
            break
        beta = w.norm()
        if stop is not None and (j + 1) % check_every == 0 and stop(torch.stack(alphas), _stack(betas, v0), beta):
            info["stopped"] = "stop"
            break
        if beta <= 1e-10 * max(1.0, float(alpha.abs())):
            if not restart:
                info["stopped"] = "exhausted"
                break
            fresh = torch.Generator().manual_seed(0x5EED + j)  # not the caller's stream, nor its start vector's seed
            w = torch.randn(dim, generator=fresh, dtype=torch.float64).to(v0)
            for _ in range(2):
                w = w - (rows[: j + 1] @ w) @ rows[: j + 1]
            if float(w.norm()) <= 1e-8:  # the basis spans the whole space
                info["stopped"] = "exhausted"
                break
            beta = torch.zeros((), dtype=v0.dtype, device=v0.device)
            betas.append(beta)
            q = w / w.norm()
            continue
        betas.append(beta)
        q = w / beta
    m = len(alphas)
    return torch.stack(alphas), _stack(betas, v0), rows[:m].T


def _stack(values: list[Tensor], like: Tensor) -> Tensor:
    return torch.stack(values) if values else like.new_zeros(0)


def tridiagonal_eigh(alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric tridiagonal matrix (alpha, beta)."""
    T = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    return torch.linalg.eigh(T)
