"""What one trigger does between the stages: the quenched points into the minima database, the dips that paths
find, the barrier to the previous trigger's minimum, the Markov model of this trigger's replicas, and the scalars
that say what each stage did. :class:`~lightning_landscape.EnergyLandscape` calls these in order on rank 0; they
hold no state of their own."""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any

import numpy as np

from lightning_landscape.dynamics.excursions import Excursions
from lightning_landscape.dynamics.minima import MinimaDatabase
from lightning_landscape.energy.basins import Joining, basins_of, plan_joins, record_path
from lightning_landscape.energy.configs import BasinConfig, MSMConfig, PathConfig, QuenchConfig
from lightning_landscape.energy.markov import MarkovModel, markov_model
from lightning_landscape.energy.quench import Minimum, add_minimum, energy_resolution, quench_point
from lightning_landscape.energy.result import EnergyResult
from lightning_landscape.energy.sampling import CrossingNoise
from lightning_landscape.geometry.paths import PathResult, dips
from lightning_landscape.objective import Objective
from lightning_landscape.probe import probe_accuracy


def admit(db: MinimaDatabase, point: Minimum, batches: list[Any], **info: Any) -> tuple[int, int]:
    """A quenched point into the database with its probe accuracy: ``(id, new minima)``
    (:func:`~lightning_landscape.energy.quench.add_minimum`; raises ValueError for a point that is not finite)."""
    return add_minimum(db, point, accuracy=float(probe_accuracy(point.outputs[None], batches)[0]), **info)


def admit_all(
    db: MinimaDatabase, quenched: list[Minimum], sources: list[str], batches: list[Any], step: int
) -> tuple[list[int | None], int]:
    """Every quenched point into the database, each with its ``source``: the id of each (None: rejected, its loss
    or parameters are not finite, warned about with a hint) and the number of new minima."""
    ids: list[int | None] = []
    new_minima = 0
    for point, source in zip(quenched, sources, strict=True):
        try:
            i, new = admit(db, point, batches, step=step, source=source)
        except ValueError:  # a diverged replica is no minimum
            ids.append(None)
            continue
        ids.append(i)
        new_minima += new
    rejected = [s for s, i in zip(sources, ids, strict=True) if i is None]
    if rejected:
        warnings.warn(
            f"lightning-landscape: EnergyLandscape at step {step} rejected {len(rejected)} quenched points whose"
            f" loss or parameters are not finite ({', '.join(rejected[:4])}). HINT: lower the replicas'"
            " `sampling.lr` or `sampling.temperature`.",
            RuntimeWarning,
            stacklevel=2,
        )
    return ids, new_minima


def follow_paths(
    db: MinimaDatabase,
    probe: Objective,
    paths: list[tuple[int, int, PathResult]],
    joins: Joining,
    configs: tuple[BasinConfig, PathConfig, QuenchConfig],
    level: float,
    merge_barrier: float | None,
    noise: CrossingNoise | None,
    step: int,
) -> tuple[int, Joining | None]:
    """The computed paths into the database; a dip along a path deeper than its merge level is quenched (it may be
    a new minimum, two per path at most) and joined to the others by straight lines (its paths wait for the next
    trigger). Returns the new minima and the straight-line joining of the dips (None without dips)."""
    basins, path_config, quench = configs
    new_minima, dipped = 0, []
    for i, j, found in paths:
        record_path(db, i, j, found, step=step, merge_level=joins.levels[(i, j)])
        for theta in [found.images[k] for k in dips(found.losses, joins.levels[(i, j)])[:2]]:
            try:
                point = quench_point(probe, theta, quench, level, step=step, source=f"path {i}-{j}")
                k, new = admit(db, point, probe.batches)
            except ValueError:  # not finite
                continue
            new_minima += new
            dipped.append(k)
    if not dipped:
        return new_minima, None
    no_paths = replace(path_config, max_paths=0)
    return new_minima, plan_joins(
        db, probe, dipped, merge_barrier, basins, no_paths, noise=noise, quench=quench, step=step
    )


def barrier_between(db: MinimaDatabase, current: int | None, previous: int | None) -> float | None:
    """The saddle between the current minimum and the previous trigger's above the current one's loss (None when
    they are one minimum or no path joined them)."""
    if previous is None or current is None or current == previous:
        return None
    saddle = db.saddles.get((min(current, previous), max(current, previous)))
    return None if saddle is None else saddle["saddle"] - db.records[current]["loss"]


def unconverged_warning(quenched: list[Minimum], level: float, config: QuenchConfig, l2: Any, step: int) -> str | None:
    """When most quenches did not converge: why it likely is so and what to change (their minima, basins and
    barriers are then upper bounds); None otherwise."""
    if not quenched or sum(q.converged for q in quenched) * 2 >= len(quenched):
        return None
    drop = float(np.median([q.loss_drop for q in quenched]))
    ratio = float(np.median([q.grad_ratio for q in quenched]))
    why = (
        " Without weight decay, a cross-entropy loss on a probe set the network can fit has no minimum at finite"
        " weights: quenches run off towards |theta| -> infinity."
        if isinstance(l2, (int, float)) and l2 == 0
        else ""
    )
    return (
        f"lightning-landscape: EnergyLandscape at step {step}: {len(quenched) - sum(q.converged for q in quenched)}"
        f" of {len(quenched)} quenches did not converge in quench.max_iter={config.max_iter} iterations"
        f" (median gradient ratio {ratio:.2g}, against quench.rtol={config.rtol:g}; the loss still falling"
        f" by more than the energy resolution {energy_resolution(config.ftol, level):.3g} per 20 iterations); they"
        f" lowered the loss by a median {drop:.3g}. The replicas end far above the minima of the probe loss, so"
        f" minima, barriers and basins are upper bounds.{why} HINT: train with weight decay (or set"
        " `weight_decay=`), raise `quench.max_iter`, or take a larger `probe.size` (harder to fit)."
    )


def quench_scalars(quenched: list[Minimum]) -> dict[str, float]:
    """What the quenches did: run, converged, stationary, the median loss drop, their gradients, certified (a
    saddle counts when its kicked sides all are), saddles kicked and the certificates' Hessian-vector products."""
    return {
        "quenches_run": len(quenched),
        "quenches_converged": sum(q.converged for q in quenched),
        "quenches_stationary": sum(q.criterion == "gradient" for q in quenched),
        "quench_loss_drop": float(np.median([q.loss_drop for q in quenched])) if quenched else float("nan"),
        "quench_grads": sum(q.n_grad_total for q in quenched),
        "quenches_certified": sum(all(k.certified for k in q.kicked) if q.kicked else q.certified for q in quenched),
        "saddles_kicked": sum(bool(q.kicked) for q in quenched),
        "certificate_hvps": sum(q.n_hvp for q in quenched),
    }


def path_scalars(paths: list[tuple[int, int, PathResult]], joins: list[Joining]) -> dict[str, float]:
    """What the joining did: straight-line joins, minima refined, paths run and converged, their gradients, and
    the median merge level of the pairs looked at (``crossing_temperature``)."""
    levels = [v for j in joins for v in j.levels.values()]
    scalars = {
        "linear_joins": sum(len(j.linear) for j in joins),
        "minima_refined": sum(len(j.refined) for j in joins),
        "paths_run": len(paths),
        "paths_converged": sum(p.converged for _, _, p in paths),
        "path_grads": sum(p.n_grad for _, _, p in paths),
    }
    if levels:
        scalars["crossing_temperature"] = float(np.median(levels))
    return scalars


def replica_model(
    excursions: Excursions, config: MSMConfig, batches: list[Any], seed: int, every: int
) -> tuple[MarkovModel | None, dict[str, float]]:
    """The Markov state model of one trigger's replicas (the metastable sets of the basin training is in now, at
    the training noise) on their sketches or outputs (``config.features``), with the sets' mean loss and probe
    accuracy, and its scalars (``slowest_timescale`` in optimizer steps, ``every`` per recorded point). None while
    there are too few points."""
    sketches, losses = list(excursions.sketches), list(excursions.losses)
    outputs = list(excursions.outputs) if excursions.outputs is not None else [None] * len(sketches)
    features = sketches if config.features == "sketch" or excursions.outputs is None else outputs
    accuracy = [
        probe_accuracy(o, batches) if o is not None else np.full(len(values), np.nan)
        for o, values in zip(outputs, losses, strict=True)
    ]
    model = markov_model(features, config, {"loss": losses, "accuracy": accuracy}, seed, plane_points=sketches)
    if model is None:
        return None, {}
    scalars = {"metastable_states": len(model.sets) or 1}
    if len(model.msm.timescales):
        scalars["slowest_timescale"] = float(model.msm.timescales[0]) * every
    return model, scalars


def minima_result(
    db: MinimaDatabase,
    probe: Objective,
    quenched: list[Minimum],
    paths: list[tuple[int, int, PathResult]],
    joins: Joining,
    configs: tuple[BasinConfig, PathConfig, QuenchConfig],
    *,
    level: float,
    noise: CrossingNoise | None,
    step: int,
    current: int | None,
    previous: int | None,
    new_minima: int,
) -> tuple[EnergyResult, str | None]:
    """Rank 0, once a trigger's paths are in: the dips along them followed (:func:`follow_paths`), the basins at
    ``configs[0].merge_barrier`` (None: each pair at the noise along it), and the trigger's
    :class:`~lightning_landscape.energy.EnergyResult` with the minima, basins and barriers tables, the
    disconnectivity graph, the paths figure and the scalars of the quenches, joins and database (``current``: this
    trigger's minimum, ``previous``: the last trigger's, ``new_minima``: those the quenches added); with the
    unconverged-quench warning (None when most quenches converged)."""
    merge_barrier = configs[0].merge_barrier
    dipped, more = follow_paths(db, probe, paths, joins, configs, level, merge_barrier, noise, step)
    basins = basins_of(db, merge_barrier)
    result = EnergyResult()
    barrier = barrier_between(db, current, previous)
    if barrier is not None:
        result.scalars["barrier_previous"] = barrier
    result.add_minima(db, basins, f"at step {step}")
    result.add_paths(paths)
    result.scalars.update(quench_scalars(quenched))
    result.scalars.update(path_scalars(paths, [joins] + ([more] if more is not None else [])))
    result.scalars.update(
        new_minima=new_minima + dipped,
        n_minima=len(db),
        n_basins=basins.n_basins,
        current_basin=int(basins.labels[current]) if current is not None else -1,
        noise_level=level,
        minima_certified=sum(db.certified),
    )
    if merge_barrier is not None:
        result.scalars["merge_barrier"] = merge_barrier
    return result, unconverged_warning(quenched, level, configs[2], probe.l2, step)
