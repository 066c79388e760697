"""Low-dimensional slices of the loss landscape, evaluated in batches of parameter vectors.

For a center ``theta`` and directions ``d_1..d_m`` (rows of ``D``), the slice at coordinates ``c`` is

    L(theta + c_1 d_1 + ... + c_m d_m),

a 1-D profile (m = 1), a 2-D plane (m = 2, Li et al. 2018) or a linear interpolation
``L((1 - t) theta_a + t theta_b)`` (Goodfellow, Vinyals & Saxe 2015) whose barrier is

    max_t L(theta_t) - max(L(theta_a), L(theta_b)).

Points are built and evaluated chunk by chunk (``Objective.losses``: ``vmap`` over parameter vectors), so
memory stays within ``memory_mb`` whatever the grid size. ``points`` restricts the evaluation to a subset
of the grid indices (how DDP ranks share a grid).

Example::

    >>> import torch
    >>> from lightning_landscape import Objective
    >>> quad = Objective(torch.nn.Linear(2, 1, bias=False), [torch.eye(2)],
    ...                  loss_fn=lambda m, A: 0.5 * (m.weight[0] @ A @ m.weight[0]))
    >>> center, d = torch.zeros(2), torch.tensor([[1.0, 0.0]])
    >>> evaluate_slice(quad, center, d, torch.tensor([[-2.0], [0.0], [2.0]])).tolist()  # 0.5 * a^2
    [2.0, 0.0, 2.0]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.func import vmap


def evaluate_slice(
    objective: Any,
    center: Tensor,
    directions: Tensor,
    coords: Tensor,
    *,
    points: range | None = None,
    memory_mb: float = 64.0,
    method: str = "auto",
    info: dict[str, Any] | None = None,
) -> Tensor:
    """``L(center + coords[i] @ directions)`` for each row ``i`` (of ``points``, default all).

    Args:
        objective: an :class:`~lightning_landscape.Objective`.
        center: (P,) the origin of the slice.
        directions: (m, P) the directions.
        coords: (N, m) the coordinates of the grid points.
        points: the grid indices to evaluate (a shard); default all.
        memory_mb: memory for the parameter vectors of one chunk.
        method: ``"batched"`` (``Objective.losses``), ``"affine"`` (see :class:`AffineInputLayers`: layers that
            read the probe batch directly are evaluated once per direction), or ``"auto"``: whichever is
            faster on the first chunk of the first slice of this objective (the choice is kept on it).
        info: if given, receives ``{"method": ...}``, the method used (``"affine"`` or ``"batched"``).
    """
    if method not in ("auto", "batched", "affine"):
        raise ValueError(f"`method` must be 'auto', 'batched' or 'affine', got {method!r}.")
    dtype, device = objective.dtype, objective.device
    center = center.to(device=device, dtype=dtype)
    directions = directions.to(device=device, dtype=dtype).reshape(-1, center.numel())
    coords = coords.to(device=device, dtype=dtype).reshape(len(coords), directions.shape[0])
    index = torch.arange(len(coords)) if points is None else torch.arange(points.start, points.stop)
    per_chunk = max(1, int(memory_mb * 2**20 // (center.numel() * center.element_size())))
    affine = AffineInputLayers(objective, center, directions) if method != "batched" else None
    if affine is not None and not affine.layers:
        affine = None
    out = []
    for start in range(0, len(index), per_chunk):
        chunk = coords[index[start : start + per_chunk]]
        if affine is not None and method == "auto" and start == 0 and len(chunk) > 1:
            faster = objective.__dict__.get("_affine_is_faster")  # timed once per objective: model and probe fixed
            if faster is None:
                faster = objective.__dict__["_affine_is_faster"] = _affine_is_faster(
                    objective, affine, center, directions, chunk
                )
            affine = affine if faster else None
        if affine is not None:
            out.append(affine.losses(chunk))
        else:
            out.append(objective.losses(center + chunk @ directions))
    if info is not None:
        info["method"] = "affine" if affine is not None else "batched"
    return torch.cat(out) if out else torch.zeros(0, dtype=dtype, device=device)


def _affine_is_faster(objective: Any, affine: AffineInputLayers, center: Tensor, dirs: Tensor, chunk: Tensor) -> bool:
    import time

    sample = chunk[: min(len(chunk), 4)]  # 4 points tell which is faster; more only cost time (once per objective)
    timings = []
    for run in (lambda: affine.losses(sample), lambda: objective.losses(center + sample @ dirs)):
        run()  # warm-up (and the batched method's own vmap-or-loop choice)
        start = time.perf_counter()
        run()
        timings.append(time.perf_counter() - start)
    return timings[0] < timings[1]


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    """The same memory seen the same way (a view such as ``flatten`` is a new object over the same storage;
    the cached tensor keeps its storage alive, so no other tensor can reuse that address)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


class AffineInputLayers:
    """Exact shortcut for layers whose input does not depend on the parameters (they read the probe batch).

    On a slice ``theta(s) = c + sum_k s_k d_k`` such a linear or convolutional layer with weight ``W(s)`` and
    bias ``b(s)`` (both affine in ``s``) outputs

        f(x; W(s), b(s)) = f(x; W_c, b_c) + sum_k s_k f(x; W_dk, b_dk),

    so its ``1 + m`` outputs are computed once per probe batch and every grid point combines them instead of
    running the layer. For an MLP whose first layer holds most of the weights (MNIST: 784 x 256 of 235k) this
    removes most of the work per point. A layer qualifies if its input is identical at two different points;
    at evaluation the shortcut is taken only for that very input tensor, so anything else is computed as usual.
    """

    _KINDS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)

    def __init__(self, objective: Any, center: Tensor, directions: Tensor) -> None:
        self.objective, self.center, self.directions = objective, center, directions
        candidates = {
            name: m
            for name, m in objective.module.named_modules()
            if isinstance(m, self._KINDS) and m.weight.requires_grad and f"{name}.weight" in objective.layout.names
        }
        first = self._inputs(candidates, center)
        second = self._inputs(candidates, center + directions[0])
        self.layers: dict[str, list[tuple[Tensor, Tensor, Tensor]]] = {}
        for name, module in candidates.items():
            a, b = first.get(name, []), second.get(name, [])
            if (
                a
                and len(a) == len(b)
                and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b, strict=True))
            ):
                self.layers[name] = [self._outputs(name, module, x) for x in a]
        self._modules = {name: candidates[name] for name in self.layers}
        self._vmap_ok: bool | None = None
        # for the batched path: every tensor at the center, and the parameters that move with the coordinates
        # (all but the shortcut layers' own weights and biases)
        self._base = objective.tensors(center)
        skipped = {f"{name}.{kind}" for name in self.layers for kind in ("weight", "bias")}
        slices = objective.layout.slices()
        self._free = [
            (f"module.{n}", slices[n], shape)
            for n, shape in zip(objective.layout.names, objective.layout.shapes, strict=True)
            if n not in skipped
        ]

    def _inputs(self, candidates: dict[str, torch.nn.Module], theta: Tensor) -> dict[str, list[Tensor]]:
        seen: dict[str, list[Tensor]] = {}
        hooks = [
            m.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, []).append(args[0]))
            for name, m in candidates.items()
        ]
        try:
            self.objective.loss(theta)
        finally:
            for h in hooks:
                h.remove()
        return seen

    def _apply(self, module: torch.nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if isinstance(module, torch.nn.Linear):
            return torch.nn.functional.linear(x, weight, bias)
        return module._conv_forward(x, weight, bias)

    def _outputs(self, name: str, module: torch.nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(input, output at the center, outputs along each direction stacked) for one call of the layer."""
        names = self.objective.layout.names
        at = [self.objective.layout.unflatten(v) for v in (self.center, *self.directions)]
        bias_name = f"{name}.bias" if f"{name}.bias" in names else None
        with torch.no_grad():
            outs = [
                self._apply(module, x, p[f"{name}.weight"], p[bias_name] if bias_name else module.bias) for p in at[:1]
            ]
            outs += [self._apply(module, x, p[f"{name}.weight"], p[bias_name] if bias_name else None) for p in at[1:]]
        return x, outs[0], torch.stack(outs[1:])

    def losses(self, coords: Tensor, chunk_size: int | None = None) -> Tensor:
        """Losses at ``center + coords @ directions``, with the shortcut layers: ``chunk_size`` points at once
        under ``torch.func.vmap`` (the other layers then run as batched matrix products), one at a time if the
        loss cannot be vmapped or a shortcut layer is called with an input it has not cached."""
        chunk_size = chunk_size or self.objective.chunk_size
        if self._vmap_ok is not False:
            try:
                out = torch.cat([self._chunk(coords[i : i + chunk_size]) for i in range(0, len(coords), chunk_size)])
                self._vmap_ok = True
                return out
            except _CacheMiss:
                self._vmap_ok = False
            except Exception:
                if self._vmap_ok:  # it worked before: a real error
                    raise
                self._vmap_ok = False
        return torch.stack([self._chunk(s[None], batched=False)[0] for s in coords])

    def _chunk(self, coords: Tensor, batched: bool = True) -> Tensor:
        obj = self.objective
        originals = {name: m.forward for name, m in self._modules.items()}
        state: dict[str, Any] = {"s": None, "calls": {}}

        def shortcut(name: str):
            def forward(x: Tensor) -> Tensor:
                i = state["calls"][name]
                state["calls"][name] += 1
                cached = self.layers[name][i] if i < len(self.layers[name]) else None
                if cached is None or not _same_tensor(x, cached[0]):
                    if batched:
                        raise _CacheMiss(name)  # its weights are not in the reduced parameter set below
                    return originals[name](x)
                _, base, along = cached
                return base + torch.tensordot(state["s"].to(along), along, dims=1)

            return forward

        def loss(s: Tensor) -> Tensor:
            state["s"], state["calls"] = s, dict.fromkeys(self._modules, 0)
            if batched:  # only the parameters the shortcut does not replace move with s
                tensors = dict(self._base)
                for key, part, shape in self._free:
                    tensors[key] = (self.center[part] + s @ self.directions[:, part]).reshape(shape)
            else:
                tensors = obj.tensors(torch.addmv(self.center, self.directions.T, s))
            total = 0.0
            for i, w in enumerate(obj.weights):
                total = total + w * obj.call(tensors, obj.batches[i], i)
            return total

        try:
            for name, m in self._modules.items():
                object.__setattr__(m, "forward", shortcut(name))
            with obj.evaluation_mode(), torch.no_grad():
                points = coords.to(self.center)
                return vmap(loss)(points) if batched else torch.stack([loss(s) for s in points])
        finally:
            for m in self._modules.values():
                object.__delattr__(m, "forward")


class _CacheMiss(Exception):
    """A shortcut layer met an input it has no cached outputs for (evaluate that chunk the exact slow way)."""


def plane_coordinates(alphas: Tensor, betas: Tensor) -> Tensor:
    """The (len(betas) * len(alphas), 2) coordinates of a grid, row-major over ``betas`` then ``alphas``."""
    b, a = torch.meshgrid(betas, alphas, indexing="ij")
    return torch.stack([a.reshape(-1), b.reshape(-1)], dim=1)


@dataclass
class Interpolation:
    """Loss along ``(1 - t) theta_a + t theta_b``, the barrier, and whether BatchNorm was recomputed."""

    ts: np.ndarray
    losses: np.ndarray
    barrier: float
    recompute_bn: bool


def barrier(losses: np.ndarray | Tensor) -> float:
    """``max_t L_t - max(L_0, L_1)`` of a profile whose ends are the two points."""
    values = np.asarray(losses, dtype=float)
    return float(values.max() - max(values[0], values[-1]))


def interpolate(
    objective: Any,
    theta_a: Tensor,
    theta_b: Tensor,
    steps: int = 25,
    *,
    recompute_bn: bool = False,
    memory_mb: float = 64.0,
) -> Interpolation:
    """The loss profile and barrier of the straight line from ``theta_a`` to ``theta_b``.

    With ``recompute_bn`` the BatchNorm statistics are recomputed at every point on the probe set
    (:meth:`~lightning_landscape.Objective.batchnorm_statistics`) instead of using the module's.
    """
    if steps < 2:
        raise ValueError(f"`steps` must be at least 2, got {steps}.")
    ts = torch.linspace(0, 1, steps, dtype=torch.float64)
    direction = (theta_b - theta_a).unsqueeze(0)
    if recompute_bn:
        losses = []
        for t in ts:
            point = (theta_a + float(t) * direction[0]).to(objective.dtype)
            losses.append(float(objective.loss(point, objective.batchnorm_statistics(point))))
        values = np.asarray(losses)
    else:
        values = evaluate_slice(objective, theta_a, direction, ts[:, None], memory_mb=memory_mb).double().cpu().numpy()
    return Interpolation(ts.numpy(), values, barrier(values), recompute_bn)


def nonconvexity_map(
    objective: Any, center: Tensor, directions: Tensor, coords: Tensor, tol: float = 1e-2
) -> np.ndarray:
    """``|lambda_min / lambda_max|`` of the Hessian at each grid point (Li et al. 2018, sec. 6): near 0 the
    landscape is locally convex, large values mean strong negative curvature."""
    from lightning_landscape.curvature import hessian_eigenvalues

    out = []
    for c in coords.to(center):
        theta = center + c @ directions.to(center)
        top = float(hessian_eigenvalues(objective, tol=tol, theta=theta, method="lanczos").eigenvalues[0])
        low = float(
            hessian_eigenvalues(objective, which="smallest", tol=tol, theta=theta, method="lanczos").eigenvalues[0]
        )
        out.append(abs(low / top) if top != 0 else float("inf"))
    return np.asarray(out)
