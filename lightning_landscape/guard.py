"""Leave no trace: save everything an analysis could disturb, and put it back exactly.

Every callback in this package runs its analyses inside :func:`preserve_state`. On exit (also when the
analysis raised) these are bit-identical to what they were on entry:

* parameter values, buffer values (BatchNorm running statistics, ``num_batches_tracked``),
  ``.grad`` of every parameter (``None`` stays ``None``) and its ``requires_grad`` flag;
* the ``training`` flag of every submodule (train/eval mode is per submodule, not per model);
* the state of every torchmetrics ``Metric`` in the module (accumulated values, update counts, caches):
  metric states are neither parameters nor buffers, and a user's ``training_step`` updates them;
* torch's intra-op thread count (libraries such as deeptime set the OpenMP count and leave it);
* the state of every optimizer (momentum buffers, Adam moments, step counters) and its
  ``param_groups`` hyper-parameters (learning rate, ...);
* the RNG streams of Python's ``random``, NumPy's global generator, torch's CPU generator and every
  initialized CUDA generator.

Tensors are restored in place (``copy_``), so the objects the optimizer and DDP hold stay the same.

Example::

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    >>> before = [t.clone() for t in net.state_dict().values()]
    >>> with preserve_state(net):
    ...     _ = net.train()(torch.randn(8, 2))  # updates BatchNorm statistics, draws random numbers
    ...     _ = net[0].weight.data.zero_()
    >>> all(torch.equal(a, b) for a, b in zip(before, net.state_dict().values()))
    True
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn


def _clone(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


class _RNGState:
    def __init__(self) -> None:
        self.python = random.getstate()
        self.numpy = np.random.get_state()
        self.torch = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self) -> None:
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def is_metric(module: nn.Module) -> bool:
    """Whether ``module`` is a torchmetrics ``Metric`` (or ``MetricCollection`` member), without importing it."""
    return any(c.__module__.startswith("torchmetrics") and c.__name__ == "Metric" for c in type(module).__mro__)


#: a Metric's bookkeeping besides the states declared with ``add_state``
_METRIC_FIELDS = ("_update_count", "_computed", "_forward_cache", "_is_synced", "_should_unsync", "_cache")


def _deep_clone(value: Any) -> Any:
    if isinstance(value, list):
        return [_deep_clone(v) for v in value]
    if isinstance(value, dict):
        return {k: _deep_clone(v) for k, v in value.items()}
    return _clone(value)


class _MetricState:
    """The accumulated state of one torchmetrics ``Metric``: its ``add_state`` values and its bookkeeping."""

    def __init__(self, metric: nn.Module) -> None:
        self.metric = metric
        names = [*getattr(metric, "_defaults", {}), *_METRIC_FIELDS]
        self.values = {n: _deep_clone(vars(metric)[n]) for n in names if n in vars(metric)}

    def restore(self) -> None:
        for name, value in self.values.items():
            object.__setattr__(self.metric, name, _deep_clone(value))


class _ModuleState:
    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.modes = [(m, m.training) for m in module.modules()]
        self.params = [(p, p.detach().clone(), _clone(p.grad), p.requires_grad) for p in module.parameters()]
        self.buffers = [(name, b, _clone(b)) for name, b in module.named_buffers()]
        self.metrics = [_MetricState(m) for m in module.modules() if is_metric(m)]

    @torch.no_grad()
    def restore(self) -> None:
        for m, training in self.modes:
            m.training = training
        for metric in self.metrics:
            metric.restore()
        for p, value, grad, requires_grad in self.params:
            p.requires_grad_(requires_grad)
            p.copy_(value)
            if grad is None:
                p.grad = None
            elif p.grad is None or p.grad.shape != grad.shape:
                p.grad = grad.clone()
            else:
                p.grad.copy_(grad)
        for name, buf, value in self.buffers:
            if buf is not None:
                buf.copy_(value)
            owner_name, _, attr = name.rpartition(".")
            owner = self.module.get_submodule(owner_name) if owner_name else self.module
            owner._buffers[attr] = buf  # an analysis may have rebound the buffer


class _OptimizerState:
    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.state = {p: {k: _clone(v) for k, v in s.items()} for p, s in optimizer.state.items()}
        self.groups = [{k: _clone(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]

    @torch.no_grad()
    def restore(self) -> None:
        opt = self.optimizer
        for p in list(opt.state):
            if p not in self.state:
                del opt.state[p]
        for p, saved in self.state.items():
            current = opt.state.setdefault(p, {})
            for key in list(current):
                if key not in saved:
                    del current[key]
            for key, value in saved.items():
                old = current.get(key)
                if isinstance(value, torch.Tensor) and isinstance(old, torch.Tensor) and old.shape == value.shape:
                    old.copy_(value)
                else:
                    current[key] = _clone(value)
        for group, saved in zip(opt.param_groups, self.groups, strict=True):
            for key in list(group):
                if key != "params" and key not in saved:
                    del group[key]
            group.update({k: _clone(v) for k, v in saved.items()})


@contextmanager
def preserve_state(
    module: nn.Module, optimizers: Iterable[torch.optim.Optimizer] = (), *, rng: bool = True
) -> Iterator[None]:
    """Run the body, then restore ``module``, ``optimizers`` and the RNG streams exactly.

    Args:
        module: the model; all its parameters (values, gradients, ``requires_grad``), buffers, metric states and
            train/eval flags are restored.
        optimizers: optimizers whose state and hyper-parameters are restored.
        rng: also save and restore the global RNG streams (Python, NumPy, torch CPU and CUDA).
    """
    saved_rng = _RNGState() if rng else None
    saved_module = _ModuleState(module)
    saved_optimizers = [_OptimizerState(o) for o in optimizers]
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        saved_module.restore()
        for saved in saved_optimizers:
            saved.restore()
        if saved_rng is not None:
            saved_rng.restore()
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
