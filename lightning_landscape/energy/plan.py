"""What a trigger needs, decided before training: the memory its least work holds, and the probe set's size and
batch size on this model and device (so that every trigger of a fit measures one energy).

Example (a small model fits on the host)::

    >>> import torch
    >>> from lightning_landscape.energy import PathConfig
    >>> check_memory(10_000, torch.float32, "auto", PathConfig(), torch.device("cpu"))
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from lightning_landscape.energy.configs import PathConfig
from lightning_landscape.energy.quench import QUENCH_VECTORS
from lightning_landscape.objective import Objective, batch_size_of, map_tensors
from lightning_landscape.probe import ProbeSpec

#: a trigger's least work, in gradients on the probe set: the current point's quench (about 40 gradients) and its
#: certificate (about 8 Hessian-vector products of about 3 gradients each)
LEAST_WORK = 64


def check_memory(n_params: int, dtype: torch.dtype, quench_dtype: str, paths: PathConfig, device: Any) -> None:
    """The least a trigger holds must fit on ``device`` (refused with sizes and a fix otherwise): one replica per
    rank (its point, velocity, gradient and the start: 4 vectors of ``P`` entries), a quench with its certificate
    (:data:`~lightning_landscape.energy.quench.QUENCH_VECTORS`, float64 with ``quench_dtype="float64"``; ``"auto"``
    quenches in float32 when float64 would not fit), and a minimum-energy path (positions, velocities and forces of
    ``paths.images`` images). The replica rounds then grow only as far as the budget allows."""
    from lightning_landscape.curvature.memory import check_vectors

    name = f"EnergyLandscape on {n_params:,} parameters"
    check_vectors(
        4 + 3 * paths.images,
        n_params,
        dtype,
        device,
        f"{name} (a path of {paths.images} images)",
        "fewer `paths.images`, or `paths.max_paths=0` to join minima by straight lines.",
    )
    float64 = quench_dtype == "float64" or dtype == torch.float64  # "auto" falls back to float32
    wide = torch.float64 if float64 else torch.float32
    check_vectors(
        QUENCH_VECTORS,
        n_params,
        wide,
        device,
        f"{name} (a certified {str(wide).removeprefix('torch.')} quench)",
        "quench.dtype='auto' (float32 when float64 does not fit), a smaller model, or one with fewer trainable"
        " parameters (freeze a part)."
        if float64
        else "a smaller model, or fewer trainable parameters.",
    )


@dataclass
class ProbePlan:
    """The probe set's ``size`` and ``batch_size`` for a fit, and the seconds of a trigger's least work on it."""

    size: int
    batch_size: int
    least_seconds: float = 0.0


def plan_probe(
    module: torch.nn.Module, sample: list[Any], spec: ProbeSpec, quench_dtype: str, allowed: float, smallest: int
) -> ProbePlan:
    """The probe plan, measured on a ``sample`` batch of training data:

    * size: cut where a trigger's least work (:data:`LEAST_WORK` gradients' worth: a certified quench of the current
      point) on the whole probe set would not fit in the ``allowed`` seconds, down to ``smallest`` samples at least;
    * batch size, when ``spec`` gives none: the whole set in one batch (fewer, larger passes) when a Hessian-vector
      product on it fits in a quarter of the free memory (in float64 when the quench may take it), else the largest
      batch that does (:func:`~lightning_landscape.curvature.memory.graph_bytes`).

    The first call's one-off costs are paid on two samples before the timing."""
    from lightning_landscape.curvature.memory import HVP_GRAPH_FACTOR, free_bytes, graph_bytes

    size, n = spec.size, sum(batch_size_of(b) for b in sample)
    objective = Objective(module, sample, spec.loss_fn, bn_mode=spec.bn_mode, dtype=spec.dtype)
    warm = [map_tensors(sample[0], lambda t: t[:2])]
    graph_bytes(Objective(module, warm, spec.loss_fn, bn_mode=spec.bn_mode, dtype=spec.dtype))
    start = time.perf_counter()
    per_sample = graph_bytes(objective) / n
    seconds = (time.perf_counter() - start) / n  # a gradient, per sample (an overestimate: small batch)
    wide = 2 if quench_dtype != "float32" and spec.dtype == torch.float32 else 1  # a float64 quench
    least = LEAST_WORK * wide * seconds  # seconds of a trigger's least work, per probe sample
    if least * size > allowed:
        size = max(min(size, smallest), int(allowed / least))
    batch = spec.batch_size or size
    fit = int(0.25 * free_bytes(next(module.parameters()).device) // max(HVP_GRAPH_FACTOR * wide * per_sample, 1.0))
    if spec.batch_size is None and fit < size:
        batch = max(2, fit)
        while size % batch == 1 and batch > 2:  # no batch of one sample (BatchNorm in train mode)
            batch -= 1
    return ProbePlan(size, batch, least * size)


def warn_plan(plan: ProbePlan, spec: ProbeSpec, allowed: float, device: Any) -> None:
    """Say what the plan changed: a probe set cut to fit the budget, a batch size chosen for memory."""
    if plan.size < spec.size:
        overrun = (
            f" Even so it takes about {plan.least_seconds:.0f} s, more than the {allowed:g} s a trigger may take:"
            " triggers will run over their budget by that."
            if plan.least_seconds > allowed
            else ""
        )
        warnings.warn(
            f"EnergyLandscape: a trigger's least work (a certified quench of the current point, about {LEAST_WORK}"
            f" gradients' worth) on {spec.size} probe samples would not fit in its budget on this model, so the"
            f" probe set is cut to {plan.size} samples for this fit (recorded as `probe_size`).{overrun} HINT: set"
            " `budget={'floor': ...}` (seconds a trigger may always take) to keep a larger probe set, or run on an"
            " accelerator.",
            UserWarning,
            stacklevel=3,
        )
    if spec.batch_size is None and plan.batch_size < plan.size:
        warnings.warn(
            f"EnergyLandscape: a Hessian-vector product on the {plan.size} probe samples in one batch would not fit"
            f" in a quarter of the free memory of {device}, so the probe set is evaluated in batches of"
            f" {plan.batch_size} (recorded as `probe_batch_size`; with BatchNorm in train mode the batch defines the"
            " energy). HINT: set `probe.batch_size` to choose it.",
            UserWarning,
            stacklevel=3,
        )


def allowed_seconds(budget: Any) -> float:
    """The seconds any trigger may take: the floor of a share, the cap without one, no limit without either."""
    return budget.floor if budget.share is not None else budget.seconds or math.inf
