"""Sharing work over ranks and gathering results, through the Trainer's strategy.

Work items ``0..n-1`` (grid points, replicas, probe batches) are split into contiguous shards,
``shard(n, rank, world)``; each rank computes its rows, and :func:`gather_rows` concatenates them on
every rank in rank order, so the result is the same array a single process would compute. Sums
(e.g. Hessian-vector products over a sharded probe set) go through :func:`reduce_sum`.

Every function here is a collective: call it on all ranks, in the same order, or DDP hangs.
With a single-process strategy they cost nothing.

Example::

    >>> [shard(10, r, 3) for r in range(3)]
    [range(0, 3), range(3, 6), range(6, 10)]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def shard(n: int, rank: int, world_size: int) -> range:
    """The contiguous block of ``range(n)`` that ``rank`` of ``world_size`` works on (sizes differ by <= 1)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"`rank` must be in [0, {world_size}), got {rank}.")
    return range(n * rank // world_size, n * (rank + 1) // world_size)


def world(strategy: Any) -> tuple[int, int]:
    """``(global_rank, world_size)`` of a Lightning strategy."""
    return int(strategy.global_rank), int(strategy.world_size)


def reduce_sum(strategy: Any, tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over ranks (returned on every rank)."""
    if strategy.world_size == 1:
        return tensor
    return strategy.reduce(tensor.clone(), reduce_op="sum")


def gather_rows(strategy: Any, rows: Tensor) -> Tensor:
    """Concatenate each rank's ``rows`` (first dimension may differ between ranks) in rank order."""
    if strategy.world_size == 1:
        return rows
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = strategy.all_gather(count).reshape(-1).tolist()
    padded = torch.zeros((max(counts), *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    padded[: rows.shape[0]] = rows
    gathered = strategy.all_gather(padded)
    return torch.cat([gathered[r, :c] for r, c in enumerate(counts)])


def broadcast(strategy: Any, obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (decisions such as "run the analysis now?")."""
    if strategy.world_size == 1:
        return obj
    return strategy.broadcast(obj, src=src)


def weighted_mean(strategy: Any, value: Tensor, n_local: int) -> Tensor:
    """``sum_r n_r value_r / sum_r n_r``: a per-rank mean over ``n_local`` samples turned into the global mean.

    With a probe set sharded over ranks, each rank's :class:`~lightning_landscape.Objective` averages its own
    ``n_r`` samples; this combines losses, gradients or Hessian-vector products into those of the whole set.
    """
    if strategy.world_size == 1:
        return value
    total = reduce_sum(strategy, torch.tensor(float(n_local), dtype=value.dtype, device=value.device))
    return reduce_sum(strategy, value * n_local) / total
