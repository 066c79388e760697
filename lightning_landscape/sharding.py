"""Full parameters of a module sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``), for the analyses.

Under Lightning's ``ModelParallelStrategy`` with ``fully_shard`` in ``configure_model``, every parameter is a
``DTensor`` of which each rank holds one shard, and the module's forward hooks all-gather them before each layer
runs. An analysis needs the whole vector ``theta`` on every rank and evaluates the loss at points of its own, so
here each rank gathers the full parameters once per trigger (:func:`full_parameters`, a collective: every rank
calls it together) and evaluates with FSDP's hooks suspended (:func:`fsdp_hooks_suspended`): with every parameter
swapped for a full plain tensor by ``functional_call``, the forward is the unsharded model's, and no collective runs
inside an evaluation. HVPs and losses are then reduced over the data-parallel ranks exactly as under DDP.

The gathered copy costs ``P b`` bytes per rank (``P`` parameters of ``b`` bytes) on top of the shard:
:func:`check_gatherable` refuses, when training starts, a model whose full parameters do not fit in half of the
device's free memory, and tensor-parallel layouts (``parallelize_module``), whose layers' hooks redistribute the
activations as well.

Example (one process, nothing sharded: the parameters themselves)::

    >>> import torch
    >>> full_parameters(torch.nn.Linear(2, 1)).keys()
    dict_keys(['weight', 'bias'])
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

_FSDP, _TENSOR_PARALLEL = "torch.distributed.fsdp", "torch.distributed.tensor"


def _dtensor() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a ``DTensor`` (FSDP2 or tensor parallel)."""
    dtensor = _dtensor()
    return dtensor is not None and any(isinstance(p, dtensor) for p in module.parameters())


def full_parameters(module: nn.Module) -> dict[str, Tensor]:
    """Every parameter of ``module`` by name, detached; a ``DTensor`` gathered into a full plain tensor (a
    collective: under FSDP2 every rank must call this, in the same order)."""
    dtensor = _dtensor()
    out = {}
    for name, p in module.named_parameters():
        if dtensor is not None and isinstance(p, dtensor):
            out[name] = p.detach().full_tensor()
        else:
            out[name] = p.detach()
    return out


def _defined_in(hook: object, prefix: str) -> bool:
    return getattr(hook, "__module__", "").startswith(prefix)


def _hooks(module: nn.Module, prefix: str) -> list:
    """``module``'s own forward hooks defined in package ``prefix``."""
    hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
    return [h for h in hooks if _defined_in(h, prefix)]


@contextmanager
def fsdp_hooks_suspended(module: nn.Module) -> Iterator[None]:
    """Within: the forward hooks that FSDP2 registered on ``module`` and its submodules are off (the hook tables
    are put back as they were, the same objects in the same order, on exit)."""
    saved = []
    for m in module.modules():
        for attr in ("_forward_pre_hooks", "_forward_hooks"):
            table = getattr(m, attr)
            if any(_defined_in(h, _FSDP) for h in table.values()):
                saved.append((m, attr, table))
                setattr(m, attr, OrderedDict((k, h) for k, h in table.items() if not _defined_in(h, _FSDP)))
    try:
        yield
    finally:
        for m, attr, table in saved:
            setattr(m, attr, table)


def check_gatherable(module: nn.Module, owner: str, dtype: torch.dtype = torch.float32) -> None:
    """Refuse, before training, a sharded ``module`` that the analyses cannot gather: tensor-parallel layers, or full
    parameters that do not fit in half of the free memory of the device. No-op for a module that is not sharded.

    Raises:
        ValueError: for tensor-parallel layers.
        MemoryError: when the gathered parameters would not fit.
    """
    if not is_sharded(module):
        return
    parallel = [name or "the root" for name, m in module.named_modules() if _hooks(m, _TENSOR_PARALLEL)]
    if parallel:
        raise ValueError(
            f"{owner} supports FSDP2 (`fully_shard`) sharding only, but the model has tensor-parallel layers"
            f" ({', '.join(parallel[:3])}{', ...' if len(parallel) > 3 else ''}). HINT: shard with `fully_shard`"
            f" alone (data parallel), or remove {owner} from this trainer."
        )
    from lightning_landscape.curvature.memory import free_bytes

    numel = sum(p.numel() for p in module.parameters())
    size = numel * torch.empty((), dtype=dtype).element_size()
    device = next(module.parameters()).device
    free = free_bytes(device)
    if size > free // 2:
        raise MemoryError(
            f"{owner} gathers the full parameters on every rank under FSDP2: {numel:,} parameters are"
            f" {size / 2**20:.3g} MiB, more than half of the {free / 2**20:.3g} MiB free on {device}. HINT: remove"
            f" {owner} from this trainer, or analyze a smaller model or a checkpoint on one device."
        )
