"""The Hessian as a linear operator ``v -> H v`` at a fixed point, optionally restricted to some parameters.

For a parameter subset ``S`` (selected by name patterns, e.g. ``["net.0.*"]`` for one layer) the operator
is the principal block ``H_SS = P_S H P_S^T``: a vector on ``S`` is embedded with zeros elsewhere,
multiplied by the full Hessian, and read back on ``S``. Eigenvalues and trace of ``H_SS`` are the
per-layer curvature measures. Every product is counted in :attr:`HessianOperator.n_products`.

Example::

    >>> import torch
    >>> from lightning_landscape import Objective
    >>> net = torch.nn.Linear(2, 1)
    >>> obj = Objective(net, [torch.eye(2)], loss_fn=lambda m, x: m(x).pow(2).sum())
    >>> op = HessianOperator(obj, params=["bias"])
    >>> op.dim, float(op.matvec(torch.ones(1)))  # d^2/db^2 of (w1 + b)^2 + (w2 + b)^2 = 4
    (1, 4.0)
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_landscape.objective import Energy


def parameter_indices(layout: Any, patterns: Sequence[str]) -> Tensor:
    """Indices into the flat vector of the parameters whose names match any of the ``fnmatch`` patterns.

    Raises:
        ValueError: if no parameter matches (the message lists the names).
    """
    slices = layout.slices()
    chosen = [n for n in layout.names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        raise ValueError(
            f"`params` {list(patterns)!r} matches no parameter. HINT: use names or patterns of"
            f" {list(layout.names)[:12]}{' ...' if len(layout.names) > 12 else ''}, e.g. 'layer1.*'."
        )
    return torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in chosen])


class HessianOperator:
    """``v -> H(theta) v`` of an objective (anything with ``hvp``, ``theta0``, ``numel``, ``layout``).

    Args:
        objective: an :class:`~lightning_landscape.Objective` (or a sharded one).
        theta: the point; default: the module's current parameters.
        params: name patterns of a parameter subset (default: all parameters).
    """

    def __init__(self, objective: Energy, theta: Tensor | None = None, params: Sequence[str] | None = None) -> None:
        self.objective = objective
        self.theta = (objective.theta0 if theta is None else theta).detach()
        self.dtype, self.device = self.theta.dtype, self.theta.device
        self.indices = None if params is None else parameter_indices(objective.layout, params).to(self.device)
        self.dim = objective.numel if self.indices is None else int(self.indices.numel())
        self.n_products = 0
        # one cached gradient graph per point where the objective offers it (a single process)
        hvp_at = getattr(objective, "hvp_at", None)
        self._hvp = hvp_at(self.theta) if hvp_at is not None else lambda v: objective.hvp(self.theta, v)

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` (``H_SS v`` on a subset)."""
        self.n_products += 1
        v = v.to(device=self.device, dtype=self.dtype)
        if self.indices is None:
            return self._hvp(v)
        full = torch.zeros_like(self.theta)
        full[self.indices] = v
        return self._hvp(full)[self.indices]

    def matmat(self, vs: Tensor) -> Tensor:
        """``H V`` for the columns of ``V`` (one product each)."""
        return torch.stack([self.matvec(v) for v in vs.T], dim=1)
