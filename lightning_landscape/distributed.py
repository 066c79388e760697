"""Sharing work over ranks and gathering results, through the Trainer's strategy.

Work items ``0..n-1`` (grid points, replicas, probe batches) are split into contiguous shards,
``shard(n, rank, world)``; each rank computes its rows, and :func:`gather_rows` concatenates them on
every rank in rank order, so the result is the same array a single process would compute. Sums
(e.g. Hessian-vector products over a sharded probe set) go through :func:`reduce_sum`.

Every function here is a collective: call it on all ranks, in the same order, or DDP hangs.
With a single-process strategy they cost nothing.

**Failing together.** An analysis alternates local work (which may fail on one rank: a bad batch, a full
disk, a numerical error) with collectives (which every rank must join). Each piece of local work runs inside
:func:`agreed`: it catches the local failure, then all ranks reduce one failure flag, and if any rank failed,
every rank raises the same :class:`RankFailure` (naming each failed rank and its error), so all ranks leave the
analysis together and none is left waiting in a collective.

Example::

    >>> [shard(10, r, 3) for r in range(3)]
    [range(0, 3), range(3, 6), range(6, 10)]
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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


def gather_objects(strategy: Any, obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order, on every rank (e.g. one work item's result per rank)."""
    if strategy.world_size == 1:
        return [obj]
    out: list[Any] = [None] * strategy.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


#: strategies under which each rank holds only a shard of the parameters
SHARDED_STRATEGIES = ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")


def check_strategy(strategy: Any, owner: str, fsdp2: bool = False) -> None:
    """Refuse, in ``setup``, a strategy that shards the parameters (FSDP, FSDP2/ModelParallel, DeepSpeed) where the
    analysis cannot gather them: every analysis needs the full parameter vector on each rank. Single-device, DDP
    (``ddp``, ``ddp_spawn``, ``ddp_notebook``) and other data-parallel strategies are supported; with ``fsdp2``
    also ``ModelParallelStrategy`` (``fully_shard`` in ``configure_model``), whose parameters the analysis gathers
    (:mod:`~lightning_landscape.sharding`; the model itself is checked when training starts).

    Raises:
        ValueError: for a sharded strategy, naming it and what is supported.
    """
    names = [c.__name__ for c in type(strategy).__mro__]
    sharded = next((n for n in names if n in SHARDED_STRATEGIES), None)
    if sharded is None or (fsdp2 and sharded == "ModelParallelStrategy"):
        return
    also = (
        " FlatnessMonitor and LandscapeSampler also run under `ModelParallelStrategy` with FSDP2 (`fully_shard`),"
        " gathering the parameters on every rank."
    )
    raise ValueError(
        f"{owner} does not support `{sharded}` yet: each rank holds only a shard of the parameters, and the"
        " analyses need the whole parameter vector. Supported: a single device and data-parallel strategies"
        f" (`ddp`, `ddp_spawn`).{also} HINT: run the landscape callbacks in a DDP run of the model, or remove them"
        " from this trainer."
    )


class RankFailure(RuntimeError):
    """A stage of an analysis failed on at least one rank; raised on every rank, so that all skip together."""


def _device(strategy: Any) -> torch.device:
    return getattr(strategy, "root_device", None) or torch.device("cpu")


def agree(strategy: Any, error: BaseException | None, stage: str) -> BaseException | None:
    """Whether any rank failed (a collective): ``None`` on every rank if none did, else the same
    :class:`RankFailure` on every rank, with each failed rank's error. Single process: ``error`` itself."""
    if strategy.world_size == 1 or isinstance(error, RankFailure):  # a RankFailure is raised on every rank at once
        return error
    flag = torch.tensor([0.0 if error is None else 1.0], device=_device(strategy))
    if float(reduce_sum(strategy, flag)[0]) == 0:
        return None
    messages = gather_objects(strategy, None if error is None else f"{type(error).__name__}: {error}")
    detail = "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None)
    failed = sum(m is not None for m in messages)
    failure = RankFailure(f"{stage} failed on {failed} of {len(messages)} ranks: {detail}")
    failure.__cause__ = error
    return failure


@contextmanager
def agreed(strategy: Any, stage: str) -> Iterator[None]:
    """Run the body, then :func:`agree` over ranks: every rank raises the same :class:`RankFailure` if the body
    failed on any rank. The body must not fail between collectives of its own (local work, or a
    :meth:`ShardedObjective.run`, which joins all its collectives before it raises)."""
    error: BaseException | None = None
    try:
        yield
    except Exception as err:
        error = err
    failure = agree(strategy, error, stage)
    if failure is not None:
        raise failure


def in_rounds(strategy: Any, n: int, work: Any, go_on: Any, stage: str) -> list[Any]:
    """``work(i)`` for every ``i < n``, one item per rank per round, while ``go_on(first item of the round)`` (a
    decision every rank takes alike, e.g. rank 0's, broadcast); each round :func:`agreed`, so that a failure on any
    rank raises on all; every result but None, in item order, on every rank.

    Example (one process)::

        >>> from types import SimpleNamespace
        >>> single = SimpleNamespace(global_rank=0, world_size=1)
        >>> in_rounds(single, 5, lambda i: i * i, lambda first: first < 3, "squares")
        [0, 1, 4]
    """
    rank, world_size = world(strategy)
    results: list[Any] = []
    for first in range(0, n, world_size):
        if not go_on(first):
            break
        mine = None
        with agreed(strategy, stage):
            if first + rank < n:
                mine = work(first + rank)
        results += [r for r in gather_objects(strategy, mine) if r is not None]
    return results


class ShardedObjective:
    """Rank 0's view of an objective whose probe set is split over ranks; the other ranks serve it.

    Estimators in :mod:`lightning_landscape.curvature` only call ``loss``, ``grad``, ``hvp`` and ``losses``.
    :meth:`run` executes an estimator on global rank 0 with this object in place of the objective: every
    call is broadcast to all ranks, each rank evaluates it on its own probe shard (weighted by its share
    ``n_r / N`` of the samples), and the results are summed with ``all_reduce``. So 2 ranks compute
    exactly what 1 process computes on the whole probe set, whatever the estimator does (data-dependent
    iteration counts, random vectors drawn on rank 0 only), and no rank can fall out of step. The result is
    broadcast to every rank; an exception on rank 0 is re-raised on every rank.

    Example::

        sharded = ShardedObjective(trainer.strategy, objective)
        result = sharded.run(lambda obj: hessian_eigenvalues(obj, k=5))
    """

    _OPS = ("loss", "grad", "hvp", "losses")

    def __init__(self, strategy: Any, local: Any) -> None:
        self.strategy = strategy
        self.local = local
        self.rank, self.world_size = world(strategy)
        n_local = float(sum(local.batch_sizes))
        total = reduce_sum(strategy, torch.tensor(n_local, dtype=torch.float64, device=local.device))
        self.weight = n_local / float(total)
        self.numel, self.dtype, self.device = local.numel, local.dtype, local.device
        self.layout, self.metadata = local.layout, local.metadata

    @property
    def theta0(self) -> Tensor:
        return self.local.theta0

    def _local_hvp(self, theta: Tensor) -> Any:
        """This rank's ``v -> H v`` at ``theta``, with the gradient graph cached while ``theta`` stays the same."""
        cached = getattr(self, "_hvp_cache", None)
        if cached is None or not torch.equal(cached[0], theta):
            self._hvp_cache = (theta.clone(), self.local.hvp_at(theta))
        return self._hvp_cache[1]

    # ------------------------------------------------------------------ served calls
    def _local(self, op: str, x: Tensor) -> Tensor:
        if op == "loss":
            out = self.local.loss(x)
        elif op == "grad":
            out = self.local.grad(x)
        elif op == "hvp":
            out = self._local_hvp(x[0])(x[1])
        else:
            out = self.local.losses(x)
        return out * self.weight

    def _call(self, op: str, x: Tensor) -> Tensor:
        if self.world_size == 1:
            return self._local(op, x)
        x = x.to(device=self.device, dtype=self.dtype).contiguous()
        header = torch.tensor([self._OPS.index(op), x.ndim, *x.shape, *[0] * (3 - x.ndim)], device=self.device)
        torch.distributed.broadcast(header, src=0)
        torch.distributed.broadcast(x, src=0)
        out = self._local(op, x)
        torch.distributed.all_reduce(out)
        return out

    def _serve(self) -> Exception | None:
        """Answer rank 0's calls until it says stop. A local failure still joins every collective (with NaNs,
        so rank 0's estimator sees it) and is returned, so that no rank is left waiting."""
        failure: Exception | None = None
        while True:
            header = torch.zeros(5, dtype=torch.long, device=self.device)
            torch.distributed.broadcast(header, src=0)
            op, ndim = int(header[0]), int(header[1])
            if op < 0:
                return failure
            x = torch.empty(tuple(header[2 : 2 + ndim].tolist()), dtype=self.dtype, device=self.device)
            torch.distributed.broadcast(x, src=0)
            try:
                out = self._local(self._OPS[op], x)
            except Exception as err:
                failure = failure or err
                shape = () if op == 0 else (len(x),) if op == 3 else (self.numel,)
                out = torch.full(shape, float("nan"), dtype=self.dtype, device=self.device)
            torch.distributed.all_reduce(out)

    def loss(self, theta: Tensor | None = None) -> Tensor:
        return self._call("loss", self.theta0 if theta is None else theta)

    def grad(self, theta: Tensor | None = None) -> Tensor:
        return self._call("grad", self.theta0 if theta is None else theta)

    def hvp(self, theta: Tensor | None, v: Tensor) -> Tensor:
        theta = self.theta0 if theta is None else theta
        return self._call("hvp", torch.stack([theta.to(v.dtype), v]))

    def losses(self, thetas: Tensor) -> Tensor:
        return self._call("losses", thetas)

    # ------------------------------------------------------------------ driver
    def run(self, estimator: Any) -> Any:
        """``estimator(self)`` on rank 0, served by every other rank; its result on every rank."""
        if self.world_size == 1:
            try:
                return estimator(self)
            finally:
                self._hvp_cache = None
        if self.rank != 0:
            failure = self._serve()
            outcome = broadcast(self.strategy, None)
            if failure is not None:
                self._hvp_cache = None
                raise RuntimeError(f"serving rank {self.rank} failed: {type(failure).__name__}: {failure}")
        else:
            try:
                outcome = ("ok", estimator(self))
            except Exception as err:
                outcome = ("error", f"{type(err).__name__}: {err}")
            torch.distributed.broadcast(torch.tensor([-1, 0, 0, 0, 0], device=self.device), src=0)
            outcome = broadcast(self.strategy, outcome)
        self._hvp_cache = None  # release the gradient graphs
        status, value = outcome
        if status == "error":
            raise RuntimeError(f"estimator failed on rank 0: {value}")
        return value
