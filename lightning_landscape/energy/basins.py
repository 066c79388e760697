"""Joining minima into basins: straight lines where they suffice, minimum-energy paths elsewhere, and the
barriers between them."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from lightning_landscape.dynamics.minima import MinimaDatabase
from lightning_landscape.energy.configs import BasinConfig, PathConfig, QuenchConfig
from lightning_landscape.energy.quench import certificate_fields, energy_resolution, quench_point, set_saddle
from lightning_landscape.energy.sampling import CrossingNoise, merge_level
from lightning_landscape.geometry.paths import PathResult, minimum_energy_path

if TYPE_CHECKING:
    from lightning_landscape.objective import Energy, Objective


def record_path(db: MinimaDatabase, i: int, j: int, path: PathResult, **info: Any) -> float:
    """The saddle of ``path`` between minima ``i`` and ``j`` into the database, with both barriers, its
    convergence and cost; returns the saddle loss. The highest point counts the ends too: an end that is not
    quite a minimum can be the highest point."""
    info = dict(
        method=path.method,
        length=path.length,
        converged=path.converged,
        criterion=path.criterion,
        force_ratio=path.force_ratio,
        **info,
    )
    return set_saddle(db, i, j, float(path.losses.max()), n_grad=path.n_grad, **info)


def linear_saddle(objective: Energy, a: Tensor, b: Tensor, images: int) -> float:
    """The highest loss on the straight line from ``a`` to ``b`` (``images`` points, ends included): an upper
    bound of the saddle between them."""
    ts = torch.linspace(0, 1, images, dtype=a.dtype, device=a.device).unsqueeze(1)
    return float(objective.losses(a + ts * (b - a)).max())


def minimum_path(objective: Energy, a: Tensor, b: Tensor, config: PathConfig, level: float = 0.0) -> PathResult:
    """The minimum-energy path between ``a`` and ``b`` with ``config``'s settings, resolved to ``config.ftol``
    (default: a tenth of the merge level ``level``)."""
    return minimum_energy_path(
        objective,
        a,
        b,
        config.images,
        config.method,
        step_size=config.step_size,
        n_steps=config.steps,
        quench_steps=0,
        ftol=energy_resolution(config.ftol, level),
    )


@dataclass
class Joining:
    """What :func:`plan_joins` decided: pairs joined by a straight line, pairs that need a minimum-energy path."""

    linear: list[tuple[int, int]]
    paths: list[tuple[int, int]]
    linear_checks: int = 0
    levels: dict[tuple[int, int], float] = field(default_factory=dict)  # the merge level of every pair looked at
    refined: list[int] = field(default_factory=list)  # minima quenched on to resolve a pair's barrier


def _candidate_pairs(
    db: MinimaDatabase, labels: np.ndarray, found: list[int], neighbours: int
) -> list[tuple[int, int]]:
    """Pairs to join, most informative first: each found minimum with its nearest minima of other basins, then the
    minimum spanning tree's edges without a saddle (so that every minimum is joined to the graph)."""
    pairs: list[tuple[int, int]] = []
    distances = db.distance_matrix() if len(db) > 1 else np.zeros((len(db), len(db)))
    for i in dict.fromkeys(found):
        others = [j for j in np.argsort(distances[i]).tolist() if labels[j] != labels[i]]
        pairs += [(min(i, j), max(i, j)) for j in others[:neighbours]]
    pairs += db.missing_tree_edges()
    return [p for p in dict.fromkeys(pairs) if p not in db.saddles]


def plan_joins(
    db: MinimaDatabase,
    objective: Objective,
    found: list[int],
    merge_barrier: float | None,
    basins: BasinConfig,
    paths: PathConfig,
    first: list[tuple[int, int]] = (),
    noise: CrossingNoise | None = None,
    quench: QuenchConfig | None = None,
    **info: Any,
) -> Joining:
    """Join what a straight line joins (recorded in ``db``, with ``info``, e.g. ``step``) and plan minimum-energy
    paths for the rest: ``first`` (e.g. the current minimum and the previous trigger's), then the found minima's
    nearest neighbours in other basins, then the spanning tree's gaps; at most ``paths.max_paths`` paths, never two
    in one basin. Each pair's merge level is ``merge_barrier``, or when None the noise along it (:func:`merge_level`),
    stored with its saddle (``merge_level``). With ``quench``, an end whose energy error exceeds a tenth of the
    pair's level is first quenched on to that resolution (:func:`refine_minimum`, ``basins.max_refine`` per call),
    so that the barrier can be told from the error of its ends."""
    db.merge_barrier = merge_barrier
    labels = db.basins()
    linear, planned, checks, levels, refined = [], [], 0, {}, set()
    for i, j in [*first, *_candidate_pairs(db, labels, found, basins.neighbours)]:
        if (i, j) in db.saddles or (i, j) in planned or (labels[i] == labels[j] and (i, j) not in first):
            continue
        a, b = (torch.from_numpy(db.theta(k)).to(device=objective.device, dtype=objective.dtype) for k in (i, j))
        level = levels[(i, j)] = merge_level(merge_barrier, noise, a, b)
        for k in (i, j):
            # a certified minimum whose error is above a tenth of the pair's level, but within reach of it (a
            # network's kinks can hold the certificate's error far above a level of 1e-6: no use quenching on)
            error = db.records[k].get("energy_error") or 0.0
            reach = level > 0 and level / 10 < error <= 10 * level and db.certified[k]
            if quench is not None and reach and k not in refined and len(refined) < basins.max_refine:
                refined.add(k)
                refine_minimum(db, objective, k, quench, level / 10)
        if refined & {i, j}:
            a, b = (torch.from_numpy(db.theta(k)).to(device=objective.device, dtype=objective.dtype) for k in (i, j))
        if checks < basins.max_linear:
            checks += 1
            highest = linear_saddle(objective, a, b, paths.images)
            if highest - max(db.records[i]["loss"], db.records[j]["loss"]) <= level:
                set_saddle(db, i, j, highest, method="linear", converged=False, merge_level=level, **info)
                linear.append((i, j))
                labels = db.basins()
                continue
        if len(planned) < paths.max_paths:
            planned.append((i, j))
    return Joining(linear, planned, checks, levels, sorted(refined))


def refine_minimum(db: MinimaDatabase, objective: Objective, k: int, config: QuenchConfig, resolution: float) -> bool:
    """Quench stored minimum ``k`` on, to the energy ``resolution`` (no kicks), and store the result in its place
    (:meth:`MinimaDatabase.relocate`) when it is no higher; returns whether it was stored. It stays certified at the
    resolution it was certified at when the finer one is not reached."""
    start = torch.from_numpy(db.theta(k)).to(device=objective.device, dtype=objective.dtype)
    point = quench_point(objective, start, replace(config, ftol=resolution), kicks=0)
    record = db.records[k]
    if not (np.isfinite(point.loss) and point.loss <= record["loss"]):
        return False
    fields = certificate_fields(point)
    if not point.certified and record.get("certified") and point.certificate.kind != "saddle":
        coarser = record.get("resolution") or float("inf")
        fields.update(certified=point.certificate.energy_error <= coarser, resolution=coarser)
    db.relocate(k, point.theta, point.loss, point.outputs, **fields, refined_to=resolution)
    return True


@dataclass
class BasinsResult:
    """The basins after joining: labels per minimum, one row per basin, the basin saddle matrix."""

    labels: np.ndarray
    rows: list[dict[str, Any]]
    saddles: np.ndarray
    merge_barrier: float  # the fixed merge level, NaN when each pair merges at the noise along it

    @property
    def n_basins(self) -> int:
        """The basins with a certified minimum (a point not known to be a minimum is its own row, not a basin)."""
        return sum(bool(row.get("certified", True)) for row in self.rows)

    @property
    def n_uncertified(self) -> int:
        """Rows of uncertified points alone."""
        return len(self.rows) - self.n_basins


def basins_of(db: MinimaDatabase, merge_barrier: float | None = None) -> BasinsResult:
    """The database's basins at ``merge_barrier`` (default: the stored one, None: each saddle's ``merge_level``);
    stores that level."""
    if merge_barrier is not None:
        db.merge_barrier = float(merge_barrier)
        db.save()
    labels = db.basins()
    fixed = float(db.merge_barrier) if db.merge_barrier is not None else float("nan")
    return BasinsResult(labels, db.basin_summary(labels), db.basin_saddles(labels), fixed)


def join_basins(
    db: MinimaDatabase,
    objective: Objective,
    found: list[int],
    merge_barrier: float | None,
    paths: PathConfig,
    basins: BasinConfig | None = None,
    noise: CrossingNoise | None = None,
    quench: QuenchConfig | None = None,
    **info: Any,
) -> tuple[BasinsResult, Joining, list[tuple[int, int, PathResult]]]:
    """The whole joining stage in one process: :func:`plan_joins`, the planned paths (:func:`minimum_path`,
    :func:`record_path`), and the resulting basins. Pairs merge at ``merge_barrier``, or when None at the noise
    along them (``noise``); paths are resolved to a tenth of ``merge_barrier`` or of the noise level. ``info`` is
    stored with every path (e.g. ``step``). Returns ``(basins, the plan, the computed paths)``."""
    plan = plan_joins(db, objective, found, merge_barrier, basins or BasinConfig(), paths, (), noise, quench, **info)
    resolution_level = merge_barrier if merge_barrier is not None else noise.level if noise is not None else 0.0
    computed = []
    for i, j in plan.paths:
        a, b = (torch.from_numpy(db.theta(k)).to(device=objective.device, dtype=objective.dtype) for k in (i, j))
        computed.append((i, j, minimum_path(objective, a, b, paths, resolution_level)))
        record_path(db, i, j, computed[-1][2], merge_level=plan.levels[(i, j)], **info)
    return basins_of(db, merge_barrier), plan, computed


#: what minima databases must share to be merged: one probe set, energy and parameter space
PROBE_KEYS = (
    "probe_size",
    "probe_batch_size",
    "probe_seed",
    "probe_batches",
    "n_params",
    "bn_mode",
    "dtype",
    "loss_fn",
    "l2",
)


def merge_databases(
    databases: list[tuple[str, MinimaDatabase]], folder: Any, dedup_tol: float
) -> tuple[MinimaDatabase, int, float | None]:
    """One database in ``folder`` of every given ``(run, database)`` that shares the first one's probe set and
    energy (:data:`PROBE_KEYS`), deduplicated in function space at ``dedup_tol``, each minimum with its ``run``.
    Returns it, the number of databases left out, and the runs' fixed merge level (the largest; None when each
    saddle merges at its own noise)."""
    probe = {k: databases[0][1].meta.get(k) for k in PROBE_KEYS}
    comparable = [(run, db) for run, db in databases if all(db.meta.get(k) == v for k, v in probe.items())]
    merged = MinimaDatabase(folder, tol=dedup_tol, meta={**databases[0][1].meta, "merged_by_analyze": True})
    for run, db in comparable:
        merged.absorb(db, run=run)
    levels = [db.merge_barrier for _, db in comparable if db.merge_barrier is not None]
    return merged, len(databases) - len(comparable), max(levels) if levels else None
