"""What the curvature estimators hold in memory, and how much of it there is.

For ``P`` parameters in ``b`` bytes each (4 for float32, 8 for float64), an analysis holds:

* the objective: the flat parameter vector and one gradient, ``2 P b``, plus the graph of a Hessian-vector product
  (activations of the probe batch and a few ``P``-vectors);
* Lanczos (``lambda_max``, ``top_eigenvalues``, ``lambda_min``): its basis, one ``P``-vector per step, ``m P b``
  for ``m`` steps (at least ``max(2k + 8, 12)`` for ``k`` eigenvalues; it stops when the Ritz residuals are below
  ``tol``); SLQ (``density``): ``density_steps`` vectors the same way; ARPACK: ``max(2k + 1, 20)`` float64 vectors;
  power iteration: ``k`` vectors;
* Hutch++ (``trace``): its sketch, ``trace_samples / 3`` vectors.

The Lanczos basis is the only part that grows with the problem's difficulty. It is capped by
:func:`vectors_that_fit` (half of the memory free on the device when it starts): a Lanczos run that reaches the cap
stops there and reports that it did not converge, instead of failing an allocation (on CPU, the operating system
kills a process that runs out of memory; on a GPU, the allocation fails). :func:`check_vectors` refuses, before
anything is allocated, an estimator whose minimum does not fit.

Example::

    >>> vectors_that_fit(1000, torch.float32, torch.device("cpu"), free=4_000_000)  # half of 4 MB, in 4 kB vectors
    500
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import torch


def _read_int(path: str) -> int | None:
    try:
        with open(path) as fh:
            text = fh.read().split()[0]
    except (OSError, IndexError):
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (e.g. ``VmSize``), in bytes."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def host_limits() -> dict[str, int]:
    """The bytes this process may still take on the host, by each limit that applies: ``MemAvailable`` of
    ``/proc/meminfo``; the address-space limit ``RLIMIT_AS`` (``ulimit -v``) minus the process' virtual size; the
    cgroup's ``memory.max`` (v2) or ``memory.limit_in_bytes`` (v1) minus its current use (containers, SLURM jobs)."""
    limits: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    limits["MemAvailable"] = int(line.split()[1]) * 1024
    except OSError:
        limits["physical memory"] = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        size = _status_bytes("VmSize")
        if soft != resource.RLIM_INFINITY and size is not None:
            limits["RLIMIT_AS"] = max(0, soft - size)
    except (ImportError, OSError, ValueError):
        pass
    for limit_file, usage_file, name in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "cgroup memory.max"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes", "cgroup"),
    ):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 2**60:  # v1 writes "no limit" as a huge number
            limits[name] = max(0, limit - usage)
    return limits


def free_bytes(device: torch.device) -> int:
    """Memory free on ``device``: ``torch.cuda.mem_get_info`` on a GPU; on CPU the smallest of
    :func:`host_limits` (``MemAvailable``, ``RLIMIT_AS``, the cgroup's limit)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return min(host_limits().values())


def vectors_that_fit(dim: int, dtype: torch.dtype, device: torch.device, free: int | None = None) -> int:
    """How many vectors of ``dim`` entries of ``dtype`` fit in half of the ``free`` memory (default:
    :func:`free_bytes` of ``device``): the cap of a Lanczos basis."""
    free = free_bytes(device) if free is None else free
    return int(0.5 * free // (dim * torch.empty((), dtype=dtype).element_size()))


def check_vectors(needed: int, dim: int, dtype: torch.dtype, device: torch.device, what: str, hint: str) -> None:
    """Raise a ``MemoryError`` naming ``what`` and ``hint`` when ``needed`` vectors of ``dim`` entries do not fit
    (:func:`vectors_that_fit`)."""
    fit = vectors_that_fit(dim, dtype, device)
    if needed > fit:
        size = torch.empty((), dtype=dtype).element_size()
        raise MemoryError(
            f"{what} needs at least {needed} vectors of {dim:,} {str(dtype).replace('torch.', '')} entries"
            f" ({needed * dim * size / 2**30:.2f} GiB), but only {fit} fit in half of the"
            f" {free_bytes(device) / 2**30:.2f} GiB free on {device}. HINT: {hint}"
        )


#: a Hessian-vector product holds about this many times the saved tensors of the loss's graph (the forward's saved
#: activations, the first backward's graph over them, and its own backward); measured 3.4x on a GPT-2-style model
#: (tests/scripts and ``scripts/bench_scale.py``), rounded up
HVP_GRAPH_FACTOR = 4


@contextmanager
def saved_storages() -> Iterator[dict[tuple[int, str], int]]:
    """Inside the block, the storages autograd saves for a backward (of the forward passes, and of backward passes
    with ``create_graph=True``), as ``{(address, device): bytes}``, each counted once."""
    storages: dict[tuple[int, str], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        with suppress(RuntimeError, NotImplementedError):  # tensors without a storage (some wrapper subclasses)
            storage = tensor.untyped_storage()
            storages[(storage.data_ptr(), str(tensor.device))] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield storages


def graph_bytes(objective: Any, batch: int = 0) -> int:
    """Bytes of the tensors that autograd saves for the backward of the loss of one probe batch (``batch``) at the
    objective's parameters: the activation memory of a gradient, measured without keeping it. A Hessian-vector
    product on that batch holds about :data:`HVP_GRAPH_FACTOR` times it."""
    with saved_storages() as storages:
        objective.loss_and_grad(batch=batch)
    return sum(storages.values())
