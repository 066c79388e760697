"""The objective: the loss ("energy") of a module on a fixed probe set, as a function of a flat vector.

For a module with trainable parameters ``theta`` in ``R^P`` and probe batches ``B_1, ..., B_n`` of sizes
``n_1, ..., n_n`` the objective is the size-weighted mean of the per-batch losses

    L(theta) = sum_b (n_b / N) * loss(f_theta, B_b),        N = sum_b n_b,

with ``loss`` either the user's ``loss_fn(module, batch)`` or, for a LightningModule, the loss that its
``training_step`` returns (called with ``self.log``/``self.log_dict`` muted and every torchmetrics ``Metric``
of the module neutralized: its ``update`` does nothing and calling it returns NaN, so the user's metric states
never see the analysis, and no batched tensor can escape into them under ``vmap``). :class:`Objective` gives
``L``, its gradient, Hessian-vector products and batched values at many parameter vectors, always by
``torch.func.functional_call``: the module itself is never mutated.

Evaluation mode is explicit and recorded in :attr:`Objective.metadata`:

* ``bn_mode="eval"`` (default): BatchNorm uses its running statistics, as at test time;
* ``bn_mode="train"``: BatchNorm normalizes with batch statistics, as SGD sees it, but running statistics
  are *not* updated (``track_running_stats`` is switched off for the call);
* dropout is off unless ``dropout=True``; autocast is off; parameters, floating buffers and floating
  batch tensors are evaluated in ``dtype`` (float32 unless asked for float64);
* scaled dot-product attention runs on its math kernel (the fused CPU/flash kernels have no double backward,
  which Hessian-vector products need).

Example::

    >>> import torch
    >>> net = torch.nn.Linear(2, 1, bias=False)
    >>> x, y = torch.eye(2), torch.zeros(2, 1)
    >>> obj = Objective(net, [(x, y)], loss_fn=lambda m, b: ((m(b[0]) - b[1]) ** 2).mean())
    >>> theta = torch.tensor([1.0, 3.0])
    >>> float(obj.loss(theta))  # (1 + 9) / 2
    5.0
    >>> obj.grad(theta).tolist(), obj.hvp(theta, torch.tensor([1.0, 0.0])).tolist()
    ([1.0, 3.0], [1.0, 0.0])
    >>> obj.losses(torch.stack([theta, 2 * theta])).tolist()
    [5.0, 20.0]
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from types import MethodType
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_unflatten

from lightning_landscape import sharding
from lightning_landscape.guard import _RNGState, is_metric
from lightning_landscape.params import ParameterLayout

LossFn = Callable[[nn.Module, Any], Tensor]
BNMode = Literal["eval", "train"]


def _first_tensor(batch: Any) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def batch_size_of(batch: Any) -> int:
    first = _first_tensor(batch)
    return int(first.shape[0]) if first is not None and first.ndim > 0 else 1


def map_tensors(batch: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return type(batch)({k: map_tensors(v, fn) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(map_tensors(v, fn) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


def _as_scalar_loss(out: Any, source: str) -> Tensor:
    if isinstance(out, Mapping) and "loss" in out:
        out = out["loss"]
    if not isinstance(out, Tensor):
        raise TypeError(
            f"{source} returned {type(out).__name__}, not a loss tensor."
            " HINT: return a scalar tensor or a dict with a 'loss' entry, or pass `loss_fn=lambda module, batch: ...`."
        )
    if out.numel() != 1:
        raise ValueError(
            f"{source} returned a tensor of shape {tuple(out.shape)}; the objective needs a scalar loss."
            " HINT: reduce it, e.g. `loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1])` (mean reduction)."
        )
    return out.reshape(())


def _second_derivative(g: Tensor, theta: Tensor, v: Tensor, retain_graph: bool = False) -> Tensor:
    """``d(g . v)/d theta`` for a gradient ``g`` built with ``create_graph=True``: the Hessian-vector product. A loss
    that is linear (or constant) in ``theta`` has a gradient with no graph back to ``theta``: its Hessian is 0."""
    if not g.requires_grad:
        return torch.zeros_like(theta)
    (hv,) = torch.autograd.grad(g, theta, grad_outputs=v, retain_graph=retain_graph, allow_unused=True)
    return torch.zeros_like(theta) if hv is None else hv


def _takes_batch_idx(step: Callable[..., Any]) -> bool:
    """Whether ``training_step`` takes ``batch_idx`` (Lightning's own rule: a parameter of that name, ``*args``,
    or at least two parameters)."""
    try:
        params = list(inspect.signature(inspect.unwrap(step)).parameters.values())
    except (TypeError, ValueError):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return (
        any(p.name == "batch_idx" for p in params)
        or any(p.kind == p.VAR_POSITIONAL for p in params)
        or (len(positional) >= 2)
    )


def _nan_like_call(*args: Any, **kwargs: Any) -> Tensor:
    return torch.tensor(float("nan"))


@contextmanager
def _overridden(overrides: Sequence[tuple[nn.Module, dict[str, Any]]]) -> Iterator[None]:
    """Within the block, each module's attributes are the given instance attributes; afterwards, what it had."""
    saved = [(m, {n: vars(m)[n] for n in attrs if n in vars(m)}) for m, attrs in overrides]
    try:
        for m, attrs in overrides:
            for name, value in attrs.items():
                object.__setattr__(m, name, value)
        yield
    finally:
        for (m, own), (_, attrs) in zip(saved, overrides, strict=True):
            for name in attrs:
                if name in own:
                    object.__setattr__(m, name, own[name])
                elif name in vars(m):
                    object.__delattr__(m, name)


def neutralized_metrics(module: nn.Module) -> AbstractContextManager[None]:
    """Within the block, every torchmetrics ``Metric`` in ``module`` ignores ``update`` and returns NaN when called.

    A user's ``training_step`` typically updates metrics (``self.train_acc(preds, y)``) and logs them; an analysis
    that evaluates the loss must not add its forward passes to those running values, and under ``vmap`` a metric
    would store batched tensors that escape the transform.
    """
    metrics = [m for m in module.modules() if is_metric(m)]
    return _overridden([(m, {"update": lambda *a, **k: None, "forward": _nan_like_call}) for m in metrics])


def local_batchnorm(module: nn.Module) -> AbstractContextManager[None]:
    """Within the block, every ``SyncBatchNorm`` in ``module`` normalizes with the statistics of its own batch, as
    ``BatchNorm`` does, instead of all-reducing them over the process group.

    The energy of a probe batch is a function of the weights and that batch alone; and the ranks evaluate different
    numbers of forward passes (replicas, quenches and the training path are split, or run on rank 0 only), so a
    collective inside the forward would pair unrelated calls, or hang.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.SyncBatchNorm)]
    return _overridden([(m, {"forward": MethodType(nn.modules.batchnorm._BatchNorm.forward, m)}) for m in norms])


def _tied_names(module: nn.Module) -> dict[str, list[str]]:
    """For every tensor that more than one submodule of ``module`` holds (tied weights), its first name (the one
    ``named_parameters`` gives) -> the names under which the other submodules hold it. A submodule used at two
    paths holds its tensors once: swapping them under both names would restore one of them wrongly."""
    first: dict[int, str] = {}
    slots: set[tuple[int, str]] = set()
    tied: dict[str, list[str]] = {}
    for path, sub in module.named_modules(remove_duplicate=False):
        for attr, t in [*sub._parameters.items(), *sub._buffers.items()]:
            if t is None or (id(sub), attr) in slots:
                continue
            slots.add((id(sub), attr))
            name = f"{path}.{attr}" if path else attr
            if first.setdefault(id(t), name) != name:
                tied.setdefault(first[id(t)], []).append(name)
    return tied


class _Evaluated(nn.Module):
    """Calls the loss of ``module`` on a batch as ``forward``, so that ``functional_call`` can swap its tensors."""

    def __init__(self, module: nn.Module, loss_fn: LossFn | None, outputs_fn: LossFn | None = None) -> None:
        super().__init__()
        self.module = module
        self.loss_fn = loss_fn
        self.outputs_fn = outputs_fn
        step = getattr(module, "training_step", None)
        self.pass_batch_idx = loss_fn is None and step is not None and _takes_batch_idx(step)

    def forward(self, batch: Any, batch_idx: int, outputs: bool = False) -> Tensor:
        if outputs:
            return self.module(_first_tensor(batch)) if self.outputs_fn is None else self.outputs_fn(self.module, batch)
        if self.loss_fn is not None:
            return _as_scalar_loss(self.loss_fn(self.module, batch), "`loss_fn`")
        out = self.module.training_step(batch, batch_idx) if self.pass_batch_idx else self.module.training_step(batch)
        return _as_scalar_loss(out, f"`{type(self.module).__name__}.training_step`")


class Energy(Protocol):
    """What the curvature estimators call: an :class:`Objective`, or under DDP a
    :class:`~lightning_landscape.distributed.ShardedObjective` that sums every call over the ranks' probe shards."""

    @property
    def numel(self) -> int: ...

    @property
    def theta0(self) -> Tensor: ...

    dtype: torch.dtype
    layout: ParameterLayout

    def loss(self, theta: Tensor | None = None) -> Tensor: ...

    def grad(self, theta: Tensor | None = None) -> Tensor: ...

    def hvp(self, theta: Tensor | None, v: Tensor) -> Tensor: ...

    def losses(self, thetas: Tensor) -> Tensor: ...


class Objective:
    """Loss, gradient, Hessian-vector products and batched losses of ``module`` on fixed ``batches``.

    Args:
        module: the network (a LightningModule or any ``nn.Module``). Never mutated.
        batches: the probe set, a non-empty sequence of batches as the dataloader yields them. They are
            copied to the module's device once.
        loss_fn: ``loss_fn(module, batch) -> scalar tensor``. Default: the loss that
            ``module.training_step(batch, batch_idx)`` returns, with logging muted.
        bn_mode: ``"eval"`` (running statistics) or ``"train"`` (batch statistics, running ones untouched).
        dropout: keep dropout layers active (off by default, so the objective is deterministic).
        dtype: float32 or float64; parameters, floating buffers and inputs are cast to it.
        chunk_size: how many parameter vectors :meth:`losses` evaluates at once under ``vmap``.
        batching: ``"auto"``, ``"vmap"`` or ``"loop"``: how :meth:`losses` batches parameter vectors.
        outputs_fn: ``outputs_fn(module, batch) -> tensor``, what :meth:`outputs` returns for a batch. Default:
            ``module(first tensor of the batch)``.
        l2: an L2 term added to every batch's loss, ``L(theta) + sum_i l2_i theta_i^2 / 2``: a number, or one
            coefficient per trainable parameter entry (``(P,)``). It is the energy that SGD with (coupled) weight
            decay ``l2`` descends; see :func:`~lightning_landscape.params.weight_decay_of`. Default 0.

    Raises:
        ValueError: empty ``batches``, a module without trainable parameters, an unknown ``bn_mode``,
            a non-floating ``dtype``, or a loss that is not a scalar.
        TypeError: no ``loss_fn`` for a module without ``training_step``.
    """

    def __init__(
        self,
        module: nn.Module,
        batches: Sequence[Any],
        loss_fn: LossFn | None = None,
        *,
        bn_mode: BNMode = "eval",
        dropout: bool = False,
        dtype: torch.dtype = torch.float32,
        chunk_size: int = 32,
        batching: Literal["auto", "vmap", "loop"] = "auto",
        outputs_fn: LossFn | None = None,
        l2: float | Tensor = 0.0,
    ) -> None:
        if bn_mode not in ("eval", "train"):
            raise ValueError(f"`bn_mode` must be 'eval' or 'train', got {bn_mode!r}.")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"`dtype` must be torch.float32 or torch.float64, got {dtype}.")
        if batching not in ("auto", "vmap", "loop"):
            raise ValueError(f"`batching` must be 'auto', 'vmap' or 'loop', got {batching!r}.")
        if chunk_size < 1:
            raise ValueError(f"`chunk_size` must be a positive integer, got {chunk_size}.")
        if isinstance(batches, (Tensor, Mapping)) or not isinstance(batches, Sequence) or len(batches) == 0:
            raise ValueError(
                f"`batches` must be a non-empty list of batches, got {type(batches).__name__}."
                " HINT: wrap a single batch in a list: `Objective(module, [(x, y)])`."
            )
        if loss_fn is None and not callable(getattr(module, "training_step", None)):
            raise TypeError(
                f"{type(module).__name__} has no `training_step`, so there is no default loss."
                " HINT: pass `loss_fn=lambda module, batch: ...` returning a scalar tensor."
            )
        self.module = module
        self.loss_fn = loss_fn
        self.bn_mode: BNMode = bn_mode
        self.dropout = dropout
        self.dtype = dtype
        self.chunk_size = chunk_size
        self.batching = batching
        self.layout = ParameterLayout.from_module(module)
        self._gathered: dict[str, Tensor] | None = None  # under FSDP2: the full parameters, see `gather`
        self.gather()
        self.set_l2(l2)
        self._wrapper = _Evaluated(module, loss_fn, outputs_fn)
        device = self.device
        with torch.inference_mode(False):
            self.batches = [map_tensors(b, lambda t: self._cast(t.to(device)).clone()) for b in batches]
        self.batch_sizes = [batch_size_of(b) for b in self.batches]
        self.weights = [n / sum(self.batch_sizes) for n in self.batch_sizes]
        self._method: str | None = None  # how `losses` batches parameter vectors, once decided
        self._fixed: dict[str, Tensor] | None = None  # the fixed tensors, held inside `evaluating()` (else None)
        self._aliases = _tied_names(self._wrapper)
        #: batch passes spent so far (one batch through the network forward, or backward): the unit of budgets
        self.passes = {"forward": 0, "backward": 0}
        rng = _RNGState()  # the check below must not consume the caller's random numbers
        try:
            with torch.no_grad():
                self.loss()
        finally:
            rng.restore()
        self.passes = {"forward": 0, "backward": 0}

    def set_l2(self, l2: float | Tensor | Mapping[str, float]) -> None:
        """Set the L2 term (``l2`` in the class docstring): a number, a ``(P,)`` tensor, or ``{parameter name:
        coefficient}`` (as :attr:`metadata` stores it; names it lacks get 0)."""
        self.__dict__.pop("_twins", None)  # `in_dtype` copies hold the previous L2 term
        if isinstance(l2, Mapping):
            sizes = dict(zip(self.layout.names, self.layout.sizes, strict=True))
            l2 = torch.cat([torch.full((sizes[n],), float(l2.get(n, 0.0)), dtype=torch.float64) for n in sizes])
        if isinstance(l2, Tensor):
            if l2.shape != (self.numel,) or not bool(torch.isfinite(l2).all()) or bool((l2 < 0).any()):
                raise ValueError(
                    f"`l2` must be a number or a ({self.numel},) tensor of finite values >= 0, got a tensor of shape"
                    f" {tuple(l2.shape)}. HINT: `weight_decay_of(optimizers, module)` builds one from the optimizers."
                )
            exact = l2.detach().double().cpu()  # the metadata keeps the float64 coefficients
            self._l2_names = {n: float(exact[s.start]) for n, s in self.layout.slices().items()}
            uniform = bool((exact == exact[0]).all())
            self.l2: float | Tensor = float(exact[0]) if uniform else l2.to(device=self.device, dtype=self.dtype)
            return
        if isinstance(l2, bool) or not (isinstance(l2, (int, float)) and math.isfinite(l2) and l2 >= 0):
            raise ValueError(f"`l2` must be a finite number >= 0, got {l2!r}. HINT: 0 (no L2 term) or e.g. 5e-4.")
        self.l2 = float(l2)

    def in_dtype(self, dtype: torch.dtype) -> Objective:
        """This objective evaluated in ``dtype`` (e.g. float64 for a quench that must locate a minimum below float32's
        rounding): the same module, loss, L2 term and probe set (its batches cast to ``dtype``), counting its batch
        passes into the same :attr:`passes`. ``self`` when it already is in ``dtype``."""
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"`dtype` must be torch.float32 or torch.float64, got {dtype}.")
        if dtype == self.dtype:
            return self
        twins = self.__dict__.setdefault("_twins", {})  # cast the probe set once per dtype
        if dtype in twins:
            return twins[dtype]
        twin = twins[dtype] = copy.copy(self)
        twin.dtype, twin._fixed, twin._method = dtype, None, None
        twin.__dict__.pop("_stacked", None)  # the stacked minibatches are rebuilt from the cast batches
        twin.batches = [map_tensors(b, twin._cast) for b in self.batches]
        if isinstance(self.l2, Tensor):
            twin.l2 = self.l2.to(dtype)
        return twin

    def first_batches(self, k: int) -> Objective:
        """This objective on its first ``k`` probe batches only (weighted by their samples): the same module, loss,
        L2 term and dtype, counting its batch passes into the same :attr:`passes`. ``self`` for ``k`` at least the
        number of batches."""
        if k >= len(self.batches):
            return self
        part = copy.copy(self)
        part._fixed, part._method = None, None
        part.__dict__.pop("_stacked", None)
        part.__dict__.pop("_twins", None)
        part.batches, part.batch_sizes = self.batches[:k], self.batch_sizes[:k]
        part.weights = [n / sum(part.batch_sizes) for n in part.batch_sizes]
        return part

    def _spend(self, forward: int, backward: int = 0) -> None:
        self.passes["forward"] += forward
        self.passes["backward"] += backward

    # ----------------------------------------------------------------- state
    @property
    def device(self) -> torch.device:
        return next(p for p in self.module.parameters() if p.requires_grad).device

    @property
    def numel(self) -> int:
        """P, the number of trainable parameters."""
        return self.layout.numel

    @property
    def theta0(self) -> Tensor:
        """The module's current trainable parameters as one flat ``dtype`` vector (a copy); under FSDP2, those
        gathered by the last :meth:`gather`."""
        return self.layout.flatten(self._parameters(), self.dtype).clone()

    def gather(self) -> None:
        """Under FSDP2 (parameters sharded as ``DTensor``), gather the module's full parameters on this rank, the
        point that :attr:`theta0` and frozen parameters then stand for (:mod:`~lightning_landscape.sharding`): a
        collective, which every rank calls together, e.g. once per trigger. A no-op for an unsharded module, whose
        parameters are read when used."""
        self._gathered = sharding.full_parameters(self.module) if sharding.is_sharded(self.module) else None
        self.__dict__.pop("_twins", None)  # `in_dtype` copies hold the previous gathered parameters

    def _parameters(self) -> dict[str, Tensor]:
        return self._gathered if self._gathered is not None else dict(self.module.named_parameters())

    @property
    def metadata(self) -> dict[str, Any]:
        """How the objective is evaluated; stored with every result."""
        return {
            "bn_mode": self.bn_mode,
            "dropout": self.dropout,
            "dtype": str(self.dtype).replace("torch.", ""),
            "autocast": False,
            "n_batches": len(self.batches),
            "n_samples": sum(self.batch_sizes),
            "n_params": self.numel,
            "batching": self._method or self.batching,
            "l2": self._l2_by_name(),
        }

    def _l2_by_name(self) -> float | dict[str, float]:
        return self._l2_names if isinstance(self.l2, Tensor) else self.l2

    def _cast(self, t: Tensor) -> Tensor:
        return t.to(self.dtype) if t.is_floating_point() else t

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """Hold the module in the objective's evaluation mode (below) across many calls, e.g. the steps of
        :func:`~lightning_landscape.dynamics.sample_basin`: the calls inside skip setting and undoing it."""
        if self._fixed is not None:  # already held
            yield
            return
        with self.evaluation_mode():
            self._fixed = self._fixed_tensors()  # the module's tensors stay put meanwhile
            try:
                yield
            finally:
                self._fixed = None

    @contextmanager
    def evaluation_mode(self) -> Iterator[None]:
        """Set train/eval flags for the declared mode, mute Lightning logging, turn autocast off; undo all."""
        if self._fixed is not None:  # inside evaluating(): already set
            yield
            return
        modules = list(self.module.modules())
        saved = [(m, m.training, getattr(m, "track_running_stats", None)) for m in modules]
        muted = []
        with ExitStack() as stack:
            for m in modules:
                m.training = False
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and self.bn_mode == "train":
                    m.training, m.track_running_stats = True, False
                elif isinstance(m, nn.modules.dropout._DropoutNd) and self.dropout:
                    m.training = True
            for name in ("log", "log_dict"):
                if callable(getattr(self.module, name, None)) and name not in vars(self.module):
                    object.__setattr__(self.module, name, lambda *a, **k: None)
                    muted.append(name)
            stack.enter_context(torch.autocast(self.device.type, enabled=False))
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            stack.enter_context(neutralized_metrics(self.module))
            stack.enter_context(local_batchnorm(self.module))
            if self._gathered is not None:  # every parameter is swapped for a full one: no FSDP all-gather
                stack.enter_context(sharding.fsdp_hooks_suspended(self.module))
            try:
                yield
            finally:
                for name in muted:
                    object.__delattr__(self.module, name)
                for m, training, track in saved:
                    m.training = training
                    if track is not None:
                        m.track_running_stats = track

    def _fixed_tensors(self, buffers: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The module's buffers (or ``buffers``) and frozen parameters in ``dtype``, named for ``functional_call``."""
        source = buffers if buffers is not None else dict(self.module.named_buffers())
        out = {f"module.{n}": self._cast(b) for n, b in source.items()}
        full = self._parameters()
        out.update(
            {f"module.{n}": self._cast(full[n]) for n, p in self.module.named_parameters() if not p.requires_grad}
        )
        return out

    def tensors(self, theta: Tensor, buffers: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The module's tensors at the flat parameters ``theta`` (and ``buffers``), by name, for :meth:`call`."""
        return self._named(self.layout.unflatten(theta), buffers)

    def _named(
        self, parameters: Mapping[str, Tensor], buffers: Mapping[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """Every tensor ``functional_call`` swaps in: the trainable ``parameters`` (as ``layout.unflatten`` gives
        them) and the fixed ones."""
        fixed = self._fixed if self._fixed is not None and buffers is None else self._fixed_tensors(buffers)
        return {**fixed, **{f"module.{n}": t for n, t in parameters.items()}}

    def call(self, tensors: dict[str, Tensor], batch: Any, batch_idx: int, outputs: bool = False) -> Tensor:
        """The wrapper's forward (the loss of ``batch``, or the outputs) with the module's tensors swapped for
        ``tensors`` (as :meth:`tensors` gives them; a tied tensor also under its other names), in the caller's
        :meth:`evaluation_mode`."""
        for name, others in self._aliases.items():
            if name in tensors:
                tensors = {**tensors, **dict.fromkeys(others, tensors[name])}
        kwargs = {"outputs": True} if outputs else None
        return functional_call(self._wrapper, tensors, (batch, batch_idx), kwargs, strict=False, tie_weights=False)

    def _batch_loss(self, theta: Tensor, index: int, buffers: Mapping[str, Tensor] | None = None) -> Tensor:
        return self._loss_on(theta, self.batches[index], index, buffers)

    def _loss_on(
        self, theta: Tensor, batch: Any, batch_idx: int, buffers: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        """The loss of ``batch`` at ``theta``, with the L2 term."""
        loss = self.call(self.tensors(theta, buffers), batch, batch_idx)
        if isinstance(self.l2, Tensor) or self.l2:
            loss = loss + 0.5 * (self.l2 * theta * theta).sum()
        return loss

    def _point(self, theta: Tensor | None) -> Tensor:
        if theta is None:
            return self.theta0
        if theta.shape != (self.numel,):
            raise ValueError(
                f"`theta` must have shape ({self.numel},), got {tuple(theta.shape)}."
                " HINT: use `objective.theta0` as a template; for many points call `objective.losses`."
            )
        return theta.to(device=self.device, dtype=self.dtype)

    # ----------------------------------------------------------------- evaluation
    def _loss_at(self, theta: Tensor, buffers: Mapping[str, Tensor] | None = None) -> Tensor:
        losses = (w * self._batch_loss(theta, i, buffers) for i, w in enumerate(self.weights))
        return sum(losses)  # type: ignore[return-value]

    def loss(
        self, theta: Tensor | None = None, buffers: Mapping[str, Tensor] | None = None, *, batch: int | None = None
    ) -> Tensor:
        """``L(theta)`` (detached scalar). ``theta=None`` means the module's current parameters; ``buffers``
        replaces the module's buffers (e.g. BatchNorm statistics from :meth:`batchnorm_statistics`); ``batch``
        evaluates the loss of that one probe batch only (a minibatch loss)."""
        theta = self._point(theta)
        self._spend(1 if batch is not None else len(self.batches))
        with self.evaluation_mode(), torch.no_grad():
            if batch is not None:
                return self._batch_loss(theta, batch, buffers).detach()
            return self._loss_at(theta, buffers).detach()

    def outputs(self, theta: Tensor | None = None) -> Tensor:
        """The module's outputs ``f_theta(x)`` on the probe inputs (the first tensor of every batch), concatenated
        over batches: ``(N, ...)``. Two parameter vectors with the same outputs are the same function, whatever
        the permutation of their hidden units, so distances between outputs compare minima in function space."""
        theta = self._point(theta)
        self._spend(len(self.batches))
        with self.evaluation_mode(), torch.no_grad():
            tensors = self.tensors(theta)
            return torch.cat([self.call(tensors, b, i, outputs=True) for i, b in enumerate(self.batches)])

    def batchnorm_statistics(self, theta: Tensor) -> dict[str, Tensor]:
        """The module's buffers with BatchNorm running statistics recomputed at ``theta`` on the probe set.

        Every BatchNorm layer is reset and run in training mode with ``momentum=None`` (a cumulative average
        over the probe batches) on copies of the buffers; the module's own buffers are not touched. Use it to
        evaluate points far from the trained weights (interpolation paths) with statistics that match them.
        """
        theta = self._point(theta)
        buffers = {n: self._cast(b.detach().clone()) for n, b in self.module.named_buffers()}
        norms = [(n, m) for n, m in self.module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for name, _ in norms:
            prefix = f"{name}." if name else ""
            buffers[prefix + "running_mean"].zero_()
            buffers[prefix + "running_var"].fill_(1.0)
            buffers[prefix + "num_batches_tracked"].zero_()
        self._spend(len(self.batches))
        with self.evaluation_mode(), torch.no_grad():
            saved = [(m, m.training, m.momentum, m.track_running_stats) for _, m in norms]
            try:
                for _, m in norms:
                    m.training, m.momentum, m.track_running_stats = True, None, True
                for i in range(len(self.batches)):
                    self._batch_loss(theta, i, buffers)
            finally:
                for m, training, momentum, track in saved:
                    m.training, m.momentum, m.track_running_stats = training, momentum, track
        return buffers

    def loss_and_grad(self, theta: Tensor | None = None, *, batch: int | None = None) -> tuple[Tensor, Tensor]:
        """``(L(theta), grad L(theta))`` from one forward and backward pass per batch; with ``batch``, those of
        that one probe batch only (the minibatch loss and gradient that an SGD step sees)."""
        indices, weights = (range(len(self.batches)), self.weights) if batch is None else ([batch], [1.0])
        self._spend(len(indices), len(indices))
        with self.evaluation_mode(), torch.enable_grad():
            theta = self._point(theta).detach().clone().requires_grad_(True)
            total = torch.zeros_like(theta)
            value = torch.zeros((), dtype=theta.dtype, device=theta.device)
            for i, w in zip(indices, weights, strict=True):
                loss = self._batch_loss(theta, i)
                (g,) = torch.autograd.grad(loss, theta)
                total += w * g
                value += w * loss.detach()
        return value, total

    def minibatch_losses_and_grads(
        self, thetas: Tensor, batches: Sequence[int], with_grad: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """``(losses (R,), grads (R, P))``: the loss and gradient of row ``r`` of ``thetas`` on the one probe batch
        ``batches[r]``, for every row: one SGD step of ``R`` replicas, each on its own minibatch (``with_grad=False``:
        the losses only, and None).

        The rows run batched, ``chunk_size`` at a time, each row's batch gathered from the stacked probe batches:
        one vmapped forward ``l = vmap(L_b)(thetas)`` and one ordinary backward of ``sum_r l_r``, whose gradient
        with respect to row ``r`` is ``grad L_{b_r}(theta_r)`` as the rows do not interact (cheaper than
        ``vmap(grad(L_b))``, which also wraps the backward's every operator). That is done when the batches stack
        (one pytree structure, tensors of one shape) and the batching is ``"vmap"``, or ``"auto"`` and vmap was the
        faster of the two on the first call with two rows or more (both timed once on those rows; the loop wins on
        large models, where vmap only adds memory); otherwise one :meth:`loss_and_grad` per row. A row's result
        does not depend on the other rows, so a replica is the same whichever replicas run beside it (to the bit
        on the networks tested; the batched and the per-row kernels round differently, by about one float32 ulp).
        Under ``vmap`` the ``batch_idx`` given to ``training_step`` is 0.
        """
        if len(thetas) != len(batches):
            raise ValueError(f"`thetas` has {len(thetas)} rows but {len(batches)} `batches` were given.")
        if not len(thetas):
            return thetas.new_zeros((0,)), thetas.new_zeros((0, self.numel)) if with_grad else None
        if self._minibatch_vmap(thetas, batches):
            return self._minibatch_vmapped(thetas, batches, with_grad)
        if not with_grad:
            return torch.stack([self.loss(t, batch=b) for t, b in zip(thetas, batches, strict=True)]), None
        pairs = [self.loss_and_grad(t, batch=b) for t, b in zip(thetas, batches, strict=True)]
        return torch.stack([v for v, _ in pairs]), torch.stack([g for _, g in pairs])

    def _minibatch_vmapped(self, thetas: Tensor, batches: Sequence[int], with_grad: bool) -> tuple[Tensor, Any]:
        (leaves, spec), device = self._stacked, self.device
        index = torch.tensor(batches, dtype=torch.long, device=leaves[0].device)
        thetas = thetas.to(device=device, dtype=self.dtype).detach()
        self._spend(len(thetas), len(thetas) if with_grad else 0)
        losses, grads = [], []
        with self.evaluation_mode(), torch.set_grad_enabled(with_grad):
            for start in range(0, len(thetas), self.chunk_size):
                rows = index[start : start + self.chunk_size]
                theta = thetas[start : start + self.chunk_size].requires_grad_(with_grad)
                # the parameters shaped before vmap and the L2 term added after it: fewer batched operators
                chosen = tree_unflatten([t.index_select(0, rows) for t in leaves], spec)
                loss = vmap(self._minibatch_loss)(self.layout.unflatten(theta), chosen)
                if with_grad:
                    grads.append(torch.autograd.grad(loss.sum(), theta)[0])
                losses.append(loss.detach())
        losses = torch.cat(losses) if len(losses) > 1 else losses[0]
        grads = (torch.cat(grads) if len(grads) > 1 else grads[0]) if with_grad else None
        if isinstance(self.l2, Tensor):
            losses = losses + 0.5 * (self.l2 * thetas * thetas).sum(-1)
            grads = grads + self.l2 * thetas if with_grad else None
        elif self.l2:  # one coefficient: fused
            losses = losses.add((thetas * thetas).sum(-1), alpha=0.5 * self.l2)
            grads = grads.add(thetas, alpha=self.l2) if with_grad else None
        return losses, grads

    def _minibatch_vmap(self, thetas: Tensor, batches: Sequence[int]) -> bool:
        """Whether :meth:`minibatch_losses_and_grads` vmaps (see there); decides once, timing both ways."""
        import time

        if not hasattr(self, "_stacked"):
            leaves = [tree_flatten(b) for b in self.batches]
            same = (
                bool(leaves[0][0])
                and all(spec == leaves[0][1] for _, spec in leaves)
                and all(
                    torch.is_tensor(x) and x.shape == y.shape and x.dtype == y.dtype
                    for flat, _ in leaves
                    for x, y in zip(flat, leaves[0][0], strict=True)
                )
            )
            # the leaves of all batches stacked, and the tree they fill
            self._stacked = (
                ([torch.stack(ts) for ts in zip(*(f for f, _ in leaves), strict=True)], leaves[0][1]) if same else None
            )
            self._minibatch_method: str | None = None if self.batching == "auto" else self.batching
        if self._stacked is None or self._minibatch_method == "loop":
            return False
        if self._minibatch_method is None:
            if len(thetas) < 2:
                return False
            timings = {}
            for method in ("loop", "vmap"):
                self._minibatch_method = method
                start = time.perf_counter()
                try:
                    self.minibatch_losses_and_grads(thetas, batches)
                except Exception as err:  # vmap is an optimization: the loop is exact
                    if method == "loop":
                        self._minibatch_method = None
                        raise
                    warnings.warn(
                        f"Objective: cannot vmap minibatch gradients of {type(self.module).__name__} ({err!s:.200});"
                        " running the rows one by one.",
                        stacklevel=3,
                    )
                    break
                timings[method] = time.perf_counter() - start
            self._minibatch_method = min(timings, key=timings.get)
        return self._minibatch_method == "vmap"

    def _minibatch_loss(self, parameters: dict[str, Tensor], batch: Any) -> Tensor:
        return self.call(self._named(parameters), batch, 0)  # without the L2 term

    def grad(self, theta: Tensor | None = None) -> Tensor:
        """``grad L(theta)``, accumulated batch by batch."""
        return self.loss_and_grad(theta)[1]

    def grads(self, thetas: Tensor) -> Tensor:
        """``grad L`` at each row of ``thetas`` (``(M, P)``), e.g. the images of a path: ``chunk_size`` rows at once
        with ``vmap(grad(L))`` when :meth:`losses` found vmap usable and faster, else one by one."""
        if self._method is None and self.batching != "loop" and len(thetas) >= 2:
            self.losses(thetas[:2])  # decides how to batch (and checks that vmap works)
        if self._method != "vmap":
            return torch.stack([self.grad(t) for t in thetas])
        thetas = thetas.to(device=self.device, dtype=self.dtype)
        self._spend(len(thetas) * len(self.batches), len(thetas) * len(self.batches))
        with self.evaluation_mode():
            return vmap(torch.func.grad(self._loss_at), chunk_size=self.chunk_size)(thetas)

    def hvp(self, theta: Tensor | None, v: Tensor) -> Tensor:
        """The Hessian-vector product ``H(theta) v`` by double backward, accumulated batch by batch."""
        if v.shape != (self.numel,):
            raise ValueError(f"`v` must have shape ({self.numel},), got {tuple(v.shape)}.")
        with self.evaluation_mode(), torch.enable_grad():
            theta = self._point(theta).detach().clone().requires_grad_(True)
            v = v.to(device=theta.device, dtype=theta.dtype).clone()
            total = torch.zeros_like(theta)
            self._spend(len(self.batches), 2 * len(self.batches))
            for i, w in enumerate(self.weights):
                (g,) = torch.autograd.grad(self._batch_loss(theta, i), theta, create_graph=True)
                total += w * _second_derivative(g, theta, v)
        return total

    def hvp_at(self, theta: Tensor | None = None) -> Callable[[Tensor], Tensor]:
        """``v -> H(theta) v`` for many ``v`` at one point: the gradient graph of every probe batch is built once
        (``create_graph=True``) and each product is a single backward pass through it, about half the cost of
        :meth:`hvp`. Holds the graphs in memory until the returned function is released: as many batches' graphs as
        fit in a quarter of the memory free on the device (the first batch's saved tensors are measured), and the
        batches beyond are recomputed at every product as :meth:`hvp` does, so that a large probe set on a large
        model costs time, not the machine."""
        from lightning_landscape.curvature.memory import free_bytes, saved_storages

        room = 0.25 * free_bytes(self.device)  # the rest: the estimators' vectors, the model, the user's training
        per_batch = 0
        with self.evaluation_mode(), torch.enable_grad():
            point = self._point(theta).detach().clone().requires_grad_(True)
            grads: list[Tensor] = []
            for i in range(len(self.batches)):
                if grads and (len(grads) + 1) * per_batch > room:
                    break  # the next graph would not fit: the rest are recomputed at each product
                with saved_storages() if i == 0 else nullcontext() as storages:
                    grads.append(torch.autograd.grad(self._batch_loss(point, i), point, create_graph=True)[0])
                per_batch = sum(storages.values()) if i == 0 else per_batch
        cached = len(grads)
        self._spend(cached, cached)

        def product(v: Tensor) -> Tensor:
            if v.shape != (self.numel,):
                raise ValueError(f"`v` must have shape ({self.numel},), got {tuple(v.shape)}.")
            rest = len(self.batches) - cached
            self._spend(rest, cached + 2 * rest)
            with torch.inference_mode(False), torch.enable_grad():
                v = v.to(device=point.device, dtype=point.dtype).clone()
                total = torch.zeros_like(point)
                for w, g in zip(self.weights, grads, strict=False):
                    total += w * _second_derivative(g, point, v, retain_graph=True)
                if rest:
                    with self.evaluation_mode():
                        for i in range(cached, len(self.batches)):
                            (g,) = torch.autograd.grad(self._batch_loss(point, i), point, create_graph=True)
                            total += self.weights[i] * _second_derivative(g, point, v)
            return total

        return product

    def losses(self, thetas: Tensor) -> Tensor:
        """``L`` at each row of the ``(M, P)`` tensor ``thetas``.

        How the rows are batched follows ``batching``: ``"vmap"`` evaluates ``chunk_size`` parameter vectors
        at once with ``torch.func.vmap`` (falling back to a loop, with a warning, if the loss cannot be
        vmapped, e.g. it calls ``.item()``); ``"loop"`` evaluates them one by one; ``"auto"`` (default) times
        both on the first chunk and keeps the faster: vmap wins for small networks, where per-call overhead
        dominates, a loop of full-size matrix products for compute-bound ones (``scripts/bench_slices.py``).
        The choice is in :attr:`metadata` (``"batching"``).
        """
        if thetas.ndim != 2 or thetas.shape[1] != self.numel:
            raise ValueError(
                f"`thetas` must have shape (M, {self.numel}), got {tuple(thetas.shape)}."
                " HINT: stack parameter vectors with `torch.stack([...])`."
            )
        thetas = thetas.to(device=self.device, dtype=self.dtype)
        self._spend(len(thetas) * len(self.batches))
        with self.evaluation_mode(), torch.no_grad():
            if self._method is None and self.batching == "auto" and len(thetas) >= 2:
                self._method = self._fastest(thetas[: min(self.chunk_size, 8)])  # 8 points tell; more cost
            method = self._method or ("loop" if self.batching == "loop" else "vmap")
            if method == "vmap":
                try:
                    out = vmap(self._loss_at, chunk_size=self.chunk_size)(thetas)
                    self._method = "vmap"
                    return out
                except Exception as err:  # vmap is an optimization: fall back to the exact loop
                    if self._method == "vmap":  # it worked before, so this is a real error
                        raise
                    self._method = "loop"
                    warnings.warn(
                        f"Objective.losses: cannot vmap over {type(self.module).__name__} ({err!s:.200});"
                        " evaluating parameter vectors one by one.",
                        stacklevel=2,
                    )
            return torch.stack([self._loss_at(t) for t in thetas])

    def _fastest(self, chunk: Tensor) -> str:
        """Time vmap and a loop on one chunk (best of two, after a warm-up); the faster one (loop if vmap fails).
        A network whose single loss takes more than 0.25 s is compute-bound: the loop, without timing the rest
        (on a 13.8M-parameter transformer the timing alone took 34 losses, minutes on a CPU)."""
        import time

        start = time.perf_counter()
        self._loss_at(chunk[0])
        if time.perf_counter() - start > 0.25:
            return "loop"
        timings = {}
        for method in ("vmap", "loop"):
            run = vmap(self._loss_at) if method == "vmap" else lambda c: torch.stack([self._loss_at(t) for t in c])
            try:
                run(chunk[:1])
                best = float("inf")
                for _ in range(2):
                    start = time.perf_counter()
                    run(chunk)
                    best = min(best, time.perf_counter() - start)
                timings[method] = best
            except Exception:
                timings[method] = float("inf")
        return min(timings, key=timings.get)
