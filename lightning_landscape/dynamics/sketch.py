"""A seeded sparse Johnson-Lindenstrauss projection of parameter vectors.

``R`` is a ``k x P`` matrix with ``s`` non-zeros per column, one in each of ``s`` blocks of ``k / s`` rows,
each ``+-1 / sqrt(s)`` with a random row and sign (Kane & Nelson 2014, "Sparser Johnson-Lindenstrauss
Transforms", the block construction; ``s = 1`` is the CountSketch). For every ``x``,

    E |R x|^2 = |x|^2,

and distances between ``m`` points are preserved to ``1 +- eps`` with high probability once
``k = O(eps^-2 log m)``. ``R`` is never materialized: only the ``s P`` row indices and signs are kept
(memory ``O(P + k)`` for fixed ``s``), and ``R x`` costs ``O(s P)`` with one ``index_add``. The same
``(P, k, s, seed)`` always gives the same ``R``, so sketches of different runs are comparable.

Example::

    >>> import torch
    >>> R = SparseProjection(dim=10_000, k=256, seed=0)
    >>> x = torch.randn(10_000)
    >>> ratio = float(R(x).norm() / x.norm())
    >>> 0.8 < ratio < 1.2
    True
    >>> torch.equal(R(2 * x), 2 * R(x)), R(torch.stack([x, x])).shape
    (True, torch.Size([2, 256]))
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class SparseProjection:
    """``x -> R x`` for the seeded sparse JL matrix ``R`` (``k x dim``, ``nnz`` non-zeros per column).

    Args:
        dim: P, the dimension of the parameter space.
        k: sketch dimension (a multiple of ``nnz``).
        seed: seed of the matrix.
        nnz: non-zeros per column (``s``). 1 (the CountSketch), as in the callbacks: the sketch is taken on the
            training path, where its ``O(s P)`` cost counts, and with ``k = 256`` one non-zero per column already
            keeps distances between the dense parameter vectors of a trajectory to a few percent.
        device: where the indices live (the parameters' device).
    """

    def __init__(self, dim: int, k: int = 256, seed: int = 0, nnz: int = 1, device: torch.device | str = "cpu"):
        if k < 1 or nnz < 1 or k % nnz:
            raise ValueError(f"`k` ({k}) must be a positive multiple of `nnz` ({nnz}). HINT: e.g. k=256, nnz=1.")
        self.dim, self.k, self.seed, self.nnz = dim, k, seed, nnz
        g = torch.Generator().manual_seed(seed)
        block = k // nnz
        rows = torch.randint(0, block, (nnz, dim), generator=g) + (torch.arange(nnz) * block)[:, None]
        signs = torch.randint(0, 2, (nnz, dim), generator=g).float().mul_(2).sub_(1).div_(math.sqrt(nnz))
        self.rows = rows.reshape(-1).to(device)
        self.signs = signs.reshape(-1).to(device)
        self.offset: Tensor | None = None

    def restricted(self, positions: Tensor, base: Tensor) -> SparseProjection:
        """``y -> R x`` where ``x`` is ``base`` with ``y`` written at ``positions``: the same sketches, for vectors of a
        subset of the coordinates (e.g. the trainable parameters, with frozen ones held at ``base``). Since ``R`` is
        linear, it is ``R[:, positions] y + R (base with zeros at positions)``."""
        out = SparseProjection.__new__(SparseProjection)
        out.dim, out.k, out.seed, out.nnz = len(positions), self.k, self.seed, self.nnz
        device = self.rows.device
        columns = (positions.to(device)[None] + self.dim * torch.arange(self.nnz, device=device)[:, None]).reshape(-1)
        out.rows, out.signs = self.rows[columns], self.signs[columns]
        rest = base.clone()
        rest[positions] = 0
        out.offset = self(rest)
        return out

    def __call__(self, x: Tensor) -> Tensor:
        """``R x`` for ``x`` of shape ``(dim,)`` or ``(n, dim)``."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected vectors of length {self.dim}, got shape {tuple(x.shape)}")
        batch = x.reshape(-1, self.dim)
        signs = self.signs if self.signs.dtype == x.dtype else self.signs.to(x.dtype)
        values = (batch if self.nnz == 1 else batch.repeat(1, self.nnz)) * signs
        out = torch.zeros(batch.shape[0], self.k, dtype=x.dtype, device=x.device)
        out.index_add_(1, self.rows, values)
        if self.offset is not None:
            out += self.offset.to(out)
        return out.reshape(*x.shape[:-1], self.k)
