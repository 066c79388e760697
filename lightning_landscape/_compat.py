"""Compatibility glue: torchvision on CPU-only torch, and the two Lightning namespaces.

torchvision on CPU torch
    Some torchvision wheels are linked against CUDA. On a CPU build of torch their C++ extension
    cannot load, and ``torchvision/_meta_registrations.py`` then fails with
    ``operator torchvision::nms does not exist``. Because torchmetrics imports torchvision when it is
    installed, ``import lightning`` fails too. Datasets, transforms and model definitions do not need
    the extension; only the two op *schemas* that the meta registrations refer to must exist.
    :func:`make_torchvision_importable` tries to load the real extension first and defines the two
    schemas only when that fails, so a working torchvision is never touched. It runs when
    ``lightning_landscape`` is imported, so import it before ``lightning`` in scripts that run on
    such a machine (our CLI, tests and DDP child processes do).

Two Lightning namespaces
    ``lightning.pytorch`` and ``pytorch_lightning`` ship the same Trainer under two names whose
    classes are distinct. :data:`CALLBACK_BASES` holds the ``Callback`` class of every namespace that
    is installed, so one callback implementation is accepted by both Trainers.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
from typing import Any

import torch

_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_torchvision_library: torch.library.Library | None = None


def make_torchvision_importable() -> bool:
    """Define torchvision's op schemas if its C++ extension cannot load. Returns True if it did."""
    global _torchvision_library
    if _torchvision_library is not None:
        return True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    extensions = glob.glob(os.path.join(os.path.dirname(spec.origin), "_C.*"))
    if not extensions:
        return False
    try:
        torch.ops.load_library(extensions[0])
        return False  # the real extension works; torchvision will find its ops
    except (OSError, RuntimeError):
        pass
    library = torch.library.Library("torchvision", "DEF")
    for schema in _TORCHVISION_SCHEMAS:
        library.define(schema)
    _torchvision_library = library
    return True


make_torchvision_importable()

LIGHTNING_NAMESPACES = tuple(
    name for name in ("lightning.pytorch", "pytorch_lightning") if importlib.util.find_spec(name.split(".")[0])
)
if not LIGHTNING_NAMESPACES:  # pragma: no cover - lightning is a dependency
    raise ImportError("lightning_landscape needs `lightning` (or `pytorch_lightning`): pip install lightning")


def lightning_classes(module: str, name: str) -> tuple[type, ...]:
    """The class ``name`` from ``<namespace>.<module>`` of every installed Lightning namespace.

    Example::

        >>> lightning_classes("loggers", "WandbLogger")  # doctest: +ELLIPSIS
        (<class 'lightning.pytorch.loggers.wandb.WandbLogger'>, <class 'pytorch_lightning...WandbLogger'>)
    """
    found: list[type] = []
    for namespace in LIGHTNING_NAMESPACES:
        found.append(getattr(importlib.import_module(f"{namespace}.{module}" if module else namespace), name))
    return tuple(found)


CALLBACK_BASES: tuple[type, ...] = lightning_classes("callbacks", "Callback")


def is_instance(obj: Any, module: str, name: str) -> bool:
    """``isinstance`` against a Lightning class in either namespace."""
    return isinstance(obj, lightning_classes(module, name))


def timer_callbacks(trainer: Any) -> list[Any]:
    """The trainer's ``Timer`` callbacks (``Trainer(max_time=...)`` adds one), of either Lightning namespace."""
    timers = lightning_classes("callbacks", "Timer")
    return [c for c in getattr(trainer, "callbacks", []) if isinstance(c, timers)]
