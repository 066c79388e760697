"""Flat parameter vectors: the coordinates of the loss landscape.

A network with trainable tensors ``W_1, ..., W_m`` is a point ``theta = concat(vec(W_1), ..., vec(W_m))``
in ``R^P``. :class:`ParameterLayout` records names, shapes and offsets so that a flat vector and the
module's parameter dictionary can be converted into each other without touching the module.

Example::

    >>> import torch
    >>> layout = ParameterLayout.from_module(torch.nn.Linear(3, 2))
    >>> layout.numel, layout.names
    (8, ('weight', 'bias'))
    >>> theta = layout.flatten(dict(torch.nn.Linear(3, 2).named_parameters()))
    >>> layout.unflatten(theta)["weight"].shape
    torch.Size([2, 3])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ParameterLayout:
    """Names, shapes and offsets of the trainable parameters of a module, in ``named_parameters`` order."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def from_module(cls, module: nn.Module, trainable_only: bool = True) -> ParameterLayout:
        """The layout of ``module``'s parameters with ``requires_grad=True`` (all of them with
        ``trainable_only=False``).

        Raises:
            ValueError: if the module has no trainable parameters.
        """
        if not any(p.requires_grad for p in module.parameters()):
            named = []
        else:
            named = [(n, p) for n, p in module.named_parameters() if p.requires_grad or not trainable_only]
        if not named:
            raise ValueError(
                f"`module` ({type(module).__name__}) has no trainable parameters, so it has no loss landscape."
                " HINT: pass a module with parameters that have `requires_grad=True`"
                " (frozen parameters are treated as constants)."
            )
        return cls(tuple(n for n, _ in named), tuple(p.shape for _, p in named))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def numel(self) -> int:
        """P, the dimension of the parameter space."""
        return sum(self.sizes)

    def slices(self) -> dict[str, slice]:
        """The slice of the flat vector that holds each named parameter."""
        out, start = {}, 0
        for name, size in zip(self.names, self.sizes, strict=True):
            out[name] = slice(start, start + size)
            start += size
        return out

    def flatten(self, tensors: Mapping[str, Tensor], dtype: torch.dtype | None = None) -> Tensor:
        """Concatenate ``tensors[name]`` in layout order into one flat (detached) vector."""
        return torch.cat([tensors[n].detach().reshape(-1).to(dtype or tensors[n].dtype) for n in self.names])

    def select(self, theta: Tensor, part: ParameterLayout) -> Tensor:
        """The entries of the parameters of ``part`` (a sub-layout, e.g. the trainable ones) from ``theta`` laid out
        by this layout; ``theta`` may carry leading batch dimensions.

        Raises:
            ValueError: if ``part`` names a parameter this layout does not hold.
        """
        if part.names == self.names:
            return theta
        slices = self.slices()
        missing = [n for n in part.names if n not in slices]
        if missing:
            raise ValueError(
                f"The stored parameter vectors do not hold {missing[:3]}: they were recorded for another module."
            )
        return torch.cat([theta[..., slices[n]] for n in part.names], dim=-1)

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Views of ``theta`` shaped like each parameter (differentiable; works under ``vmap``)."""
        if theta.shape[-1] != self.numel:
            raise ValueError(
                f"`theta` has {theta.shape[-1]} entries but the module has {self.numel} trainable parameters."
                " HINT: build theta with `objective.theta0` or `layout.flatten(...)`."
            )
        parts = torch.split(theta, self.sizes, dim=-1)
        return {n: p.reshape(*theta.shape[:-1], *s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)}


def weight_decay_of(optimizers: Sequence[torch.optim.Optimizer], module: nn.Module) -> Tensor:
    """The weight decay of each trainable parameter entry of ``module`` under ``optimizers``, as a ``(P,)`` float64
    vector in :class:`ParameterLayout` order (0 for parameters no optimizer holds).

    Each parameter group's ``weight_decay`` is that group's L2 coefficient ``lambda``: SGD and Adam with
    (coupled) weight decay descend ``L(theta) + lambda |theta|^2 / 2``; a decoupled one (AdamW) shrinks the
    weights by the same ``lr lambda theta`` per step as SGD on that energy. Groups without weight decay (biases
    and norms, often) keep 0.

    Example::

        >>> net = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD([{"params": [net.weight], "weight_decay": 1e-3}, {"params": [net.bias]}], lr=0.1)
        >>> weight_decay_of([opt], net).tolist()
        [0.001, 0.001, 0.0]
    """
    layout = ParameterLayout.from_module(module)
    slices = layout.slices()
    index = {id(p): slices[n] for n, p in module.named_parameters() if n in slices}
    out = torch.zeros(layout.numel, dtype=torch.float64)
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            decay = float(group.get("weight_decay", 0.0) or 0.0)
            for p in group["params"]:
                if id(p) in index:
                    out[index[id(p)]] = decay
    return out
