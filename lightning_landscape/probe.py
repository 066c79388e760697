"""The probe set and the energy on it: one specification that every callback takes as ``probe=``.

Every analysis measures the *energy* ``E(theta)``: the mean training loss over a fixed *probe set* of training
samples, drawn once (seeded) and evaluated with autocast off, in ``dtype``, with BatchNorm in ``bn_mode``. A
:class:`ProbeSpec` says which samples, in which batches, and which loss:

================ ===================================================================================================
``size``         samples in the probe set: the first ``size`` of a permutation of the training set drawn with ``seed``
``batch_size``   its batch size (None: the train loader's; ``EnergyLandscape``: the whole probe set in one batch
                 where a Hessian-vector product on it fits in memory, else the largest batch that does)
``seed``         seed of the draw (recorded with every result)
``bn_mode``      ``"eval"`` (running statistics) or ``"train"`` (batch statistics); None: the analysis' default
                 (``"eval"`` for curvature and slices, ``"train"`` for ``EnergyLandscape``, the energy SGD sees)
``dtype``        ``torch.float32`` or ``torch.float64`` (or ``"float32"``/``"float64"``, e.g. in YAML)
``loss_fn``      ``loss_fn(module, batch) -> scalar``; None: the module's ``training_step`` loss (required with
                 manual optimization)
``outputs_fn``   ``outputs_fn(module, batch) -> tensor``, the outputs that fingerprint minima (``EnergyLandscape``);
                 None: ``module(batch[0])``
``batches``      the probe set as a list of batches as the train loader yields them (each rank uses its block of
                 them under DDP); required for iterable datasets
================ ===================================================================================================

The specification is recorded with every result (:attr:`ProbeSpec.metadata`), so that ``lightning-landscape analyze``
rebuilds the same energy offline.

Example::

    >>> ProbeSpec.of({"size": 512, "dtype": "float64"}).dtype
    torch.float64
    >>> ProbeSpec(size=0)
    Traceback (most recent call last):
    ...
    ValueError: `probe.size` must be an integer >= 1, got 0. HINT: e.g. `probe.size=256`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lightning_landscape.checks import as_config, check_int
from lightning_landscape.objective import BNMode, LossFn

_DTYPES = {name: getattr(torch, name) for name in ("float32", "float64")}


@dataclass(frozen=True)
class ProbeSpec:
    """Which training samples the energy is measured on, in which batches, with which loss (module docstring)."""

    size: int = 256
    batch_size: int | None = None
    seed: int = 0
    bn_mode: BNMode | None = None
    dtype: torch.dtype | str = torch.float32
    loss_fn: LossFn | None = None
    outputs_fn: LossFn | None = None
    batches: list[Any] | None = None

    def __post_init__(self) -> None:
        check_int("probe.size", self.size, example=256)
        check_int("probe.batch_size", self.batch_size, optional=True, example=64)
        check_int("probe.seed", self.seed, minimum=0, example=0)
        if self.bn_mode not in ("eval", "train", None):
            raise ValueError(
                f"`probe.bn_mode` must be 'eval', 'train' or None, got {self.bn_mode!r}."
                " HINT: 'eval' uses BatchNorm running statistics, 'train' batch statistics."
            )
        dtype = (
            _DTYPES.get(self.dtype.removeprefix("torch."), self.dtype) if isinstance(self.dtype, str) else self.dtype
        )
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"`probe.dtype` must be torch.float32 or torch.float64, got {self.dtype!r}. HINT: 'float64' for"
                " tight tolerances on small models, 'float32' otherwise."
            )
        object.__setattr__(self, "dtype", dtype)
        for name in ("loss_fn", "outputs_fn"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise ValueError(f"`probe.{name}` must be callable as `{name}(module, batch)`, got {value!r}.")
        if self.batches is not None:
            if not isinstance(self.batches, (list, tuple)) or not self.batches:
                raise ValueError(
                    f"`probe.batches` must be a non-empty list of batches, got {type(self.batches).__name__}."
                    " HINT: e.g. `probe={'batches': [next(iter(loader))]}`."
                )
            object.__setattr__(self, "batches", list(self.batches))

    @classmethod
    def of(cls, value: ProbeSpec | dict | None) -> ProbeSpec:
        """``value`` as a ``ProbeSpec``: an instance, a dict of its fields (e.g. from YAML), or None (defaults)."""
        return as_config(cls, value, "probe")

    def resolved(self, bn_mode: BNMode) -> ProbeSpec:
        """The analysis' default BatchNorm mode filled in when none is given."""
        return dataclasses.replace(self, bn_mode=self.bn_mode or bn_mode)

    @property
    def metadata(self) -> dict[str, Any]:
        """The specification as recorded with every result (JSON-serializable; the functions by their qualified
        names, the given batches by their number)."""
        return {
            "probe_size": self.size,
            "probe_batch_size": self.batch_size,
            "probe_seed": self.seed,
            "bn_mode": self.bn_mode,
            "dtype": str(self.dtype).removeprefix("torch."),
            "loss_fn": _name(self.loss_fn),
            "outputs_fn": _name(self.outputs_fn),
            "probe_batches": len(self.batches) if self.batches is not None else None,
        }


def _name(fn: Any) -> str | None:
    if fn is None:
        return None
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def probe_chunks(n_samples: int, size: int, batch_size: int, seed: int) -> list[list[int]]:
    """Indices of the probe set: the first ``size`` of a permutation of ``range(n_samples)`` drawn with ``seed``,
    in batches of ``batch_size``. The same arguments give the same set in any process (offline analysis too).

    >>> probe_chunks(10, 4, 3, seed=0) == probe_chunks(10, 4, 3, seed=0)
    True
    >>> [len(c) for c in probe_chunks(10, 4, 3, seed=0)]
    [3, 1]
    """
    size = min(size, n_samples)
    indices = torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed))[:size].tolist()
    return [indices[i : i + batch_size] for i in range(0, size, batch_size)]


def probe_accuracy(outputs: np.ndarray, batches: list[Any]) -> np.ndarray:
    """Accuracy of flattened probe outputs ``(..., N * C)`` against the probe batches' integer targets (their
    second tensor), or NaN when the batches carry no class labels."""
    targets = [b[1] for b in batches if isinstance(b, (list, tuple)) and len(b) > 1 and torch.is_tensor(b[1])]
    if not batches or len(targets) != len(batches) or targets[0].is_floating_point() or targets[0].ndim != 1:
        return np.full(outputs.shape[:-1], np.nan)
    labels = torch.cat(targets).cpu().numpy()
    n_classes = outputs.shape[-1] // len(labels)
    if n_classes < 2 or n_classes * len(labels) != outputs.shape[-1]:
        return np.full(outputs.shape[:-1], np.nan)
    predicted = outputs.reshape(*outputs.shape[:-1], len(labels), n_classes).argmax(-1)
    return (predicted == labels).mean(-1)
