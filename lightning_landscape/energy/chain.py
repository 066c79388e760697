"""The chain of all triggers: one Markov chain of every replica and the training path, its robustness, and the
metastable stages of training."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from lightning_landscape.dynamics.msm import (
    MarkovStateModel,
    default_clusters,
    set_labels,
)
from lightning_landscape.dynamics.tpt import TransitionPaths
from lightning_landscape.energy.configs import MSMConfig
from lightning_landscape.energy.markov import TRANSITION_KEYS, MarkovModel, markov_model, transition_between
from lightning_landscape.energy.result import STAGE_COLUMNS


def restart_points(replicas: int, fraction: float, visits: Sequence[float]) -> dict[int, int]:
    """Which replicas start from an earlier point (overlapping swarms), and from which candidate: the last
    ``round(fraction * replicas)`` replicas (replica 0 always starts at the current point) take the candidates of
    the fewest visits in the chain so far, least-visited first (adaptive sampling: where the chain is least
    certain). ``visits``: one count per candidate (NaN: unknown, taken last). Returns ``{replica: candidate}``."""
    n = min(round(fraction * replicas), replicas - 1, len(visits))
    order = np.argsort(np.nan_to_num(np.asarray(visits, dtype=float), nan=np.inf), kind="stable")
    return {replicas - 1 - k: int(order[k]) for k in range(n)}


@dataclass
class Chain:
    """One Markov chain of every replica recorded so far (all triggers): the fitted model (None while there are
    too few points), how many points it has and which fraction lies in its largest connected set, and the
    transition from the source point's set to the target point's (or why there is none)."""

    model: MarkovModel | None
    points: int
    connected: float
    transition: TransitionPaths | str
    source: tuple[int, int] | None = None  # the point whose set the transition starts from
    target: tuple[int, int] | None = None  # the point whose set it ends in
    robustness: Robustness | None = None  # what survives other clusterings, and whether the sets are metastable


@dataclass
class Robustness:
    """What of a chain's sets and transition survives a change of discretisation, and whether its sets are
    metastable at all (:func:`chain_robustness`)."""

    refits: list[tuple[int, int]]  # (k-means seed, states) of every refit
    agreement: list[float]  # per set of the chain: its worst best-match overlap (Jaccard of points) over the refits
    transition: float  # the fraction of refits in which the source and the target point lie in different sets
    metastable: bool  # the slowest implied timescales are separated from the lag and stable across lags
    timescales: list[float] = field(default_factory=list)  # those timescales (in lags), at the chain's lag

    def robust_sets(self, threshold: float = 0.5) -> list[int]:
        """The sets whose points are matched, overlap at least ``threshold``, by one set in every refit."""
        return [k for k, a in enumerate(self.agreement) if a >= threshold]

    @property
    def transition_survives(self) -> bool:
        """The transition is reported only when its sets are metastable and every refit has it too."""
        return self.metastable and self.transition == 1.0


def not_robust(robustness: Robustness) -> str:
    """Why a chain's transition is not reported, in one sentence."""
    if not robustness.metastable:
        scales = ", ".join(f"{t:.3g}" for t in robustness.timescales) or "none"
        return (
            f"its sets are not metastable (slowest implied timescales {scales} lags: not at least 2 lags and stable"
            " across lags), e.g. strata of one downhill relaxation; the transition between them is not reported"
        )
    return (
        f"the transition did not survive a change of discretisation: its two sets were apart in"
        f" {100 * robustness.transition:.0f}% of {len(robustness.refits)} refits (other k-means seeds and state counts)"
    )


def point_sets(model: MarkovModel) -> np.ndarray:
    """Every recorded point's metastable set (all trajectories concatenated): -1 outside the largest connected
    set; 0 for every point inside it when there is one set."""
    return set_labels(model.msm, np.concatenate(model.dtrajs))


def set_agreement(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """For every set ``k >= 0`` of ``reference`` (point labels), the largest Jaccard overlap of its points with the
    points of one set of ``other``: 1 when some set of ``other`` holds exactly its points.

    Example::

        >>> set_agreement(np.array([0, 0, 1, 1, -1]), np.array([1, 1, 1, 0, 0])).round(3).tolist()
        [0.667, 0.333]
    """
    rows = []
    for k in range(int(reference.max()) + 1 if len(reference) else 0):
        mine = reference == k
        best = 0.0
        for m in set(other[mine].tolist()) - {-1}:
            theirs = other == m
            best = max(best, float((mine & theirs).sum() / (mine | theirs).sum()))
        rows.append(best)
    return np.asarray(rows)


def metastable_timescales(msm: MarkovStateModel, sets: int, separation: float = 2.0, drift: float = 0.3) -> bool:
    """Whether ``sets`` metastable sets are supported: the ``sets - 1`` slowest implied timescales are at least
    ``separation`` lags (slower than the lag they are measured at, Prinz et al. 2011) and change by at most
    ``drift`` (relative) from the shortest lag over the next two (a plateau: the model is Markovian on their scale). A
    relaxation that runs downhill once, as replicas from the current point at temperature 0 do, fails it: its
    "sets" are strata of one descent, ordered along it, and their timescales are the descent's, which grow with
    the lag."""
    k = sets - 1
    if k < 1 or len(msm.timescales) < k or not np.isfinite(msm.timescales[:k]).all():
        return False
    if (np.asarray(msm.timescales[:k]) < separation).any():  # in units of the lag
        return False
    its = msm.implied_timescales
    if len(its) < 3 or its.shape[1] < k or not np.isfinite(its[:3, :k]).all():
        return False
    return bool((np.abs(its[1:3, :k] - its[0, :k]) <= drift * its[0, :k]).all())


def chain_robustness(
    features: list[np.ndarray],
    model: MarkovModel,
    config: MSMConfig,
    seed: int,
    source: tuple[int, int],
    target: tuple[int, int],
) -> Robustness:
    """Refit the chain with ``config.refit_seeds`` k-means seeds times ``config.refit_counts`` state counts (``n``,
    ``2n``, ... with ``n`` the chain's) and compare each refit's sets with the chain's, point by point
    (:func:`set_agreement`), and whether the refit separates the ``source`` point's set from the ``target`` point's.
    A metastable set of a landscape does not depend on where k-means puts its centres; a set that a change of seed
    dissolves is an artefact of the discretisation."""
    points = int(sum(len(f) for f in features))
    n = config.n_clusters or default_clusters(points)
    offsets = np.cumsum([0] + [len(d) for d in model.dtrajs])
    reference = point_sets(model)
    at = [int(offsets[t] + i) for t, i in (source, target)]
    refits, worst, apart = [], np.ones(int(reference.max()) + 1 if len(reference) else 0), []
    for count in [n * (m + 1) for m in range(config.refit_counts)]:
        for other_seed in [seed + r for r in range(config.refit_seeds)]:
            if (count, other_seed) == (n, seed) or count * 2 > points:
                continue
            refit = markov_model(features, replace(config, n_clusters=count), {}, other_seed)
            if refit is None:
                continue
            labels = point_sets(refit)
            refits.append((other_seed, count))
            worst = np.minimum(worst, set_agreement(reference, labels)) if len(worst) else worst
            apart.append(labels[at[0]] >= 0 and labels[at[1]] >= 0 and labels[at[0]] != labels[at[1]])
    msm = model.msm
    sets = int(msm.metastable_assignment.max()) + 1 if msm.metastable_assignment is not None else 1
    return Robustness(
        refits,
        worst.tolist(),
        float(np.mean(apart)) if apart else 1.0,
        metastable_timescales(msm, sets),
        np.asarray(msm.timescales[: max(sets - 1, 0)], dtype=float).tolist(),
    )


def chain_columns(width: int, seed: int = 0, size: int = 2048) -> np.ndarray:
    """The chain's features: a seeded subset of at most ``size`` of the ``width`` output coordinates (outputs on the
    probe set, flattened), sorted; the same for the same ``(width, seed)``."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(width, min(width, size), replace=False))


def chain_of(
    trajectories: list[np.ndarray],
    values: dict[str, list[np.ndarray]],
    sources: Sequence[tuple[int, int]],
    targets: Sequence[tuple[int, int]],
    config: MSMConfig,
    seed: int = 0,
    step: float = 1.0,
    dim: int | None = 5,
) -> Chain:
    """The chain of ``trajectories`` (features ``(n_t, d)`` of every recorded point, e.g. every replica of every
    trigger and the training path) with per-point ``values`` (e.g. ``{"loss": [...], "accuracy": [...]}``, one
    array per trajectory, NaN where unknown), and the transition from the metastable set of the first of
    ``sources`` that lies in the largest connected set to that of the last of ``targets`` that does (both
    ``(trajectory, index)`` points in order, e.g. the training path). The initial weights, where SGD runs downhill
    and no replica comes back, are often outside it, and so is the current point while the loss still falls: there
    is no metastable set there, and the transition runs from the first set that training entered to the last. The
    features are reduced to their first ``dim`` principal components, refitted on all points at every call (None:
    as they are).

    Outputs on the probe set are the features to use: invariant to permutations of hidden units, and blind to the
    weights' drift along flat directions, so replicas of different triggers meet in them where their sketches do
    not (measured on the digits study: 37% of the points in the largest connected set with outputs, 5% with
    sketches)."""
    features = list(trajectories)
    if dim is not None:
        stacked = np.concatenate(features)
        mean = stacked.mean(0)
        _, _, vt = np.linalg.svd(stacked - mean, full_matrices=False)
        features = [(f - mean) @ vt[:dim].T for f in features]
    model = markov_model(features, config, values, seed)
    points = int(sum(len(t) for t in trajectories))
    if model is None:
        return Chain(None, points, 0.0, "too few points for a chain")
    active = np.isin(np.concatenate(model.dtrajs), model.msm.active_set)

    def first_inside(candidates: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
        inside = (p for p in candidates if np.isin(model.dtrajs[p[0]][p[1]], model.msm.active_set))
        return next(inside, candidates[0] if len(candidates) else None)

    source, target = first_inside(sources), first_inside(list(targets)[::-1])
    if source is None or target is None:
        return Chain(model, points, float(active.mean()), "no source or target point")
    transition = transition_between(model, source, target, step)
    robustness = chain_robustness(features, model, config, seed, source, target)
    return Chain(model, points, float(active.mean()), transition, source, target, robustness)


def training_stages(
    model: MarkovModel, dtrajs: Sequence[np.ndarray], steps: Sequence[np.ndarray]
) -> list[dict[str, int]]:
    """The metastable stages of training: the training path's points (``dtrajs``, the chain's states of its pieces,
    with their optimizer ``steps``) by the metastable set they lie in, merged into runs of one set, in order:
    ``{"set", "first_step", "last_step", "points"}``; ``set`` -1 for points outside the largest connected set.
    Without metastable sets (one set), a single stage 0 while the path is inside the connected set."""
    stages: list[dict[str, int]] = []
    for states, times in zip(dtrajs, steps, strict=True):
        for label, at in zip(set_labels(model.msm, states).tolist(), times, strict=True):
            if stages and stages[-1]["set"] == label:
                stages[-1].update(last_step=int(at), points=stages[-1]["points"] + 1)
            else:
                stages.append({"set": label, "first_step": int(at), "last_step": int(at), "points": 1})
    return stages


# ----------------------------------------------------------------------------------------------- saved runs
@dataclass
class SavedReplicas:
    """Every replica :meth:`~lightning_landscape.dynamics.Excursions.save` wrote under one run's ``excursions/``
    folder, in the chain's features: ``features`` (outputs at the chain's columns, one ``(n, d)`` array per
    replica), ``losses`` and ``accuracy`` (per point, NaN where unknown), ``keys`` (``(trigger step, replica) ->``
    index), the step ``rules`` (``(lr, momentum) ->`` the first trigger that used it), the ``record_every`` of the
    replicas, and the stores that could not be read (``skipped``: their outputs are kept, with NaN losses)."""

    features: list[np.ndarray] = field(default_factory=list)
    losses: list[np.ndarray] = field(default_factory=list)
    accuracy: list[np.ndarray] = field(default_factory=list)
    keys: dict[tuple[int, int], int] = field(default_factory=dict)
    rules: dict[tuple[float | None, float], int] = field(default_factory=dict)
    every: int = 1
    skipped: list[dict[str, str]] = field(default_factory=list)


def read_replicas(folder: str | Path, columns: np.ndarray, batches: list[Any] | None = None) -> SavedReplicas:
    """The one reader of saved replicas (the callback's chain and ``analyze`` both use it): their outputs at
    ``columns``, their stores' losses and step rules, and with the probe ``batches`` their probe accuracy."""
    from lightning_landscape.dynamics.excursions import saved_replicas, step_rule
    from lightning_landscape.dynamics.store import TrajectoryStore
    from lightning_landscape.probe import probe_accuracy

    saved = SavedReplicas()
    for trigger, replica, outputs, path in saved_replicas(folder):
        saved.keys[(trigger, replica)] = len(saved.features)
        outputs = np.asarray(outputs)
        saved.features.append(outputs[:, columns].astype(np.float64))
        saved.accuracy.append(probe_accuracy(outputs, batches or []))
        try:
            store = TrajectoryStore.open(path)
        except (OSError, ValueError) as err:
            saved.losses.append(np.full(len(outputs), np.nan))
            saved.skipped.append({"path": str(path), "reason": str(err)})
            continue
        saved.losses.append(store.stats["loss"])
        saved.every = int(store.meta.get("record_every", 1))
        saved.rules.setdefault(step_rule(store.meta), trigger)
    return saved


@dataclass
class TrainingPath:
    """The training path in the chain's features: its optimizer ``steps``, ``features`` (outputs at the chain's
    columns), probe ``accuracy`` and the step ``rules`` training took there (``(lr, momentum)`` of one plain SGD,
    else None), one entry per recorded point."""

    steps: list[int] = field(default_factory=list)
    features: list[np.ndarray] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    rules: list[tuple[float, float] | None] = field(default_factory=list)

    def add(self, step: int, features: np.ndarray, accuracy: float, rule: tuple[float, float] | None) -> None:
        self.steps.append(int(step))
        self.features.append(np.asarray(features, dtype=np.float32))
        self.accuracy.append(float(accuracy))
        self.rules.append(rule)

    def fragments(self, rule: tuple[float, float], every: int) -> list[list[int]]:
        """The path's points (indices) as the chain's trajectories: runs of consecutive recordings, ``every`` steps
        apart (a resume breaks them), linked where training stepped by the replicas' ``rule`` at both points (so a
        learning-rate schedule breaks the path where the rule changed); single points otherwise, located in the
        chain but not counted: a step of Adam, or of SGD at another rate, is not a replica's step, and counting it
        would mix two dynamics in one transition matrix.

        Example::

            >>> path = TrainingPath()
            >>> for step, rule in [(0, (0.1, 0.0)), (5, (0.1, 0.0)), (10, None), (15, (0.1, 0.0))]:
            ...     path.add(step, np.zeros(2), 1.0, rule)
            >>> path.fragments((0.1, 0.0), every=5)
            [[0, 1], [2], [3]]
        """
        pieces: list[list[int]] = []
        for i, step in enumerate(self.steps):
            follows = i > 0 and step - self.steps[i - 1] == every
            if follows and self.rules[i - 1] == self.rules[i] == rule:
                pieces[-1].append(i)
            else:
                pieces.append([i])
        return pieces

    def save(self, path: str | Path, columns: np.ndarray, pieces: list[list[int]], probe: list[int]) -> None:
        """To ``training-path.npz`` beside the replicas, with the chain's ``columns``, its ``pieces`` and the
        ``probe`` set's ``[size, seed]`` (``analyze`` joins runs of one probe set only)."""
        np.savez(
            path,
            steps=np.asarray(self.steps),
            features=np.stack(self.features),
            accuracy=np.asarray(self.accuracy),
            columns=columns,
            fragment=np.concatenate([np.full(len(piece), k) for k, piece in enumerate(pieces)]),
            probe=probe,
        )


@dataclass
class ChainRun:
    """One run in a chain: its replicas, its training path's features and steps, the path's ``pieces`` (the
    chain's trajectories, :meth:`TrainingPath.fragments`) and its probe accuracy."""

    replicas: SavedReplicas
    path: np.ndarray
    steps: np.ndarray
    pieces: list[np.ndarray]
    accuracy: np.ndarray

    @classmethod
    def load(cls, saved: str | Path) -> tuple[ChainRun, tuple[Any, ...]]:
        """A run's ``training-path.npz`` and the replicas beside it, with the key of the runs that can share a chain
        (one probe set, the same columns)."""
        data = np.load(saved)
        fragment = data["fragment"]
        run = cls(
            read_replicas(Path(saved).parent, data["columns"]),
            data["features"].astype(np.float64),
            data["steps"],
            [np.flatnonzero(fragment == f) for f in np.unique(fragment)],
            data["accuracy"],
        )
        return run, (tuple(data["probe"].tolist()), data["columns"].tobytes())


def chain_of_runs(runs: list[ChainRun], config: MSMConfig, seed: int = 0, current: tuple[int, int] | None = None):
    """The chain of every replica and training path of ``runs`` (:func:`chain_of`; the replicas first, then each
    run's path pieces, losses NaN on the path), with the transition along the first run's path: from the first
    set it enters to the set of the ``current`` replica start (``(trigger, replica)`` of the first run), else of
    its last point. Returns the chain and the index of each run's first path piece."""
    features, losses, accuracy, first = [], [], [], []
    for run in runs:
        features += run.replicas.features
        losses += run.replicas.losses
        accuracy += run.replicas.accuracy
    for run in runs:
        first.append(len(features))
        features += [run.path[piece] for piece in run.pieces]
        losses += [np.full(len(piece), np.nan) for piece in run.pieces]
        accuracy += [np.asarray(run.accuracy)[piece] for piece in run.pieces]
    head = runs[0]
    path = [(first[0] + f, i) for f, piece in enumerate(head.pieces) for i in range(len(piece))]
    targets = [*path, (head.replicas.keys[current], 0)] if current in head.replicas.keys else path
    values = {"loss": losses, "accuracy": accuracy}
    chain = chain_of(features, values, path, targets, config, seed, step=config.lag * head.replicas.every)
    return chain, first


def stages_of(chain: Chain, runs: list[ChainRun], first: list[int]) -> list[list[dict[str, int]]]:
    """Each run's metastable stages of training in the chain (:func:`training_stages`)."""
    return [
        training_stages(
            chain.model, chain.model.dtrajs[start : start + len(run.pieces)], [run.steps[p] for p in run.pieces]
        )
        for run, start in zip(runs, first, strict=True)
    ]


def transition_of(chain: Chain) -> dict[str, Any]:
    """What the chain says of its transition, only where its sets survive refits and are metastable: the
    :func:`~lightning_landscape.energy.markov.transition_summary`, or ``{"none": why}``."""
    from lightning_landscape.energy.markov import transition_summary

    if chain.model is None or isinstance(chain.transition, str):
        return {"none": str(chain.transition)}
    if chain.robustness is not None and not chain.robustness.transition_survives:
        return {"none": not_robust(chain.robustness)}
    return transition_summary(chain.model, chain.transition)


class TriggerChain:
    """The chain of all triggers as :class:`~lightning_landscape.EnergyLandscape` keeps it from trigger to trigger
    (rank 0): the training path (:attr:`path`, recorded every ``every`` optimizer steps at the chain's
    :attr:`columns`), and after each trigger (:meth:`update`) the chain of every replica saved so far and of the
    path: its :attr:`stages` (the training path's metastable stages), its :attr:`transition` (from the initial
    weights' set to the current weights', or ``{"none": why}``) and its :attr:`visits` of each replica end and of
    each path point's step (where the next trigger's restarts start: the least visited first).

    Args:
        config: the chain's Markov model (lag, states, sets).
        seed: seeds the chain's columns and its k-means.
        every: the optimizer steps between recorded points (the replicas' ``record_every``).
    """

    def __init__(self, config: MSMConfig, seed: int, every: int) -> None:
        self.config, self.seed, self.every = config, seed, every
        self.path = TrainingPath()
        self.columns: np.ndarray | None = None
        self.visits: dict[tuple[int, int], float] = {}  # (trigger step, replica) -> the chain's points in its state
        self.path_visits: dict[int, float] = {}  # training step -> the chain's points in its state
        self.stages: list[dict[str, int]] = []
        self.transition: dict[str, Any] = {}
        self._warned: set[str] = set()

    def record(self, step: int, outputs: np.ndarray, accuracy: float, rule: tuple[float, float] | None) -> None:
        """The training path's point at ``step``: its flattened probe ``outputs``, accuracy and step rule."""
        if self.columns is None:
            self.columns = chain_columns(outputs.size, self.seed)
        self.path.add(step, outputs.reshape(-1)[self.columns], accuracy, rule)

    def update(
        self,
        folder: Path,
        step: int,
        width: int,
        rule: tuple[float, float],
        batches: list[Any] | None,
        probe: list[int],
        result: Any,
    ) -> None:
        """The chain after the trigger at ``step`` whose replicas (the first recorded at the current point) are saved
        in ``folder`` (``width``: the number of their probe outputs): the training path saved beside them (with the
        ``probe`` set's ``[size, seed]``), cut into pieces by the replicas' step ``rule``; the chain of all of it
        (:func:`chain_of_runs`); its scalars, the ``stages`` table and the transition's pathways and path atlas into
        ``result`` (:class:`~lightning_landscape.energy.EnergyResult`). Warns once when the replicas mix step rules or
        the chain is disconnected."""
        if self.columns is None:
            self.columns = chain_columns(width, self.seed)
        replicas = read_replicas(folder, self.columns, batches)
        if not self.path.steps:  # the path could not be recorded: this trigger's start stands for it
            first_replica = min(key for key in replicas.keys if key[0] == step)
            self.path.add(step, replicas.features[replicas.keys[first_replica]][0], float("nan"), None)
        if len(replicas.rules) > 1:
            self._warn_once(
                "rules",
                f"the chain of all triggers mixes replicas of {len(replicas.rules)} step rules ((lr, momentum) first"
                " seen at steps " + ", ".join(f"{r} at {at}" for r, at in replicas.rules.items()) + "), e.g. under a"
                " learning-rate schedule: its transition matrix, rates and first-passage times are of that mixture."
                " HINT: fix `sampling.lr` (and `sampling.momentum`) for one dynamics.",
                step,
            )
        pieces = self.path.fragments(rule, self.every)
        self.path.save(folder / "training-path.npz", self.columns, pieces, probe)
        steps = np.asarray(self.path.steps)
        run = ChainRun(replicas, np.stack(self.path.features).astype(np.float64), steps, pieces, self.path.accuracy)
        chain, first = chain_of_runs([run], self.config, self.seed, current=(step, 0))
        result.scalars.update(chain_points=chain.points, chain_connected=chain.connected)
        if chain.model is None:
            self.transition = {"none": str(chain.transition)}
            return
        counts = np.bincount(np.concatenate(chain.model.dtrajs))
        ends = [key for key in replicas.keys if key[0] == step]
        self.visits = {key: float(counts[chain.model.dtrajs[replicas.keys[key]][-1]]) for key in ends}
        self.path_visits = {
            int(steps[i]): float(counts[state])
            for piece, dtraj in zip(pieces, chain.model.dtrajs[first[0] :], strict=True)
            for i, state in zip(piece, dtraj, strict=True)
        }
        self.stages = stages_of(chain, [run], first)[0]
        result.scalars.update(chain_sets=len(chain.model.sets) or 1, chain_stages=len(self.stages))
        result.table("stages", STAGE_COLUMNS, [[s[c] for c in STAGE_COLUMNS] for s in self.stages])
        if chain.connected < 0.9:
            self._warn_once(
                "disconnected",
                f"the chain of all triggers is disconnected, only {100 * chain.connected:.0f}% of its {chain.points}"
                " points lie in its largest connected set: the replicas of different triggers do not meet, so rates"
                " and pathways between them are unknown. HINT: raise `sampling.restarts` (replicas from earlier"
                " ends), `sampling.steps`, or trigger more often.",
                step,
            )
        if chain.robustness is not None:
            result.scalars.update(
                chain_sets_robust=len(chain.robustness.robust_sets()),
                chain_transition_agreement=chain.robustness.transition,
                chain_metastable=float(chain.robustness.metastable),
            )
        summary = transition_of(chain)
        if "none" in summary:
            self.transition = summary
            return
        self.transition = {k: summary[k] for k in ("source_set", "target_set", "mfpt_steps", "pathways")}
        for end, (t, i) in (("source_step", chain.source), ("target_step", chain.target)):
            self.transition[end] = int(steps[pieces[t - first[0]][i]]) if t >= first[0] else step
        result.scalars.update(chain_mfpt=summary["mfpt_steps"], chain_rate=summary["rate_per_step"])
        result.add_transition(summary)

    def _warn_once(self, kind: str, message: str, step: int) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(f"lightning-landscape: EnergyLandscape at step {step}: {message}", RuntimeWarning, 3)

    def state_dict(self) -> dict[str, Any]:
        """The path's first point, the chain's start: a resumed run keeps it (the rest is in the run directory)."""
        path = self.path
        if not path.steps:
            return {"path_start": None}
        return {"path_start": [path.steps[0], path.features[0].tolist(), path.accuracy[0]]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        start = state.get("path_start")
        self.path = TrainingPath()
        if start is not None:
            self.path.add(int(start[0]), np.asarray(start[1]), float(start[2]), None)


def chain_of_saved_runs(saved: list[tuple[str, ChainRun, tuple[Any, ...]]], config: MSMConfig, seed: int, result: Any):
    """One chain of several runs' saved replicas and training paths (``(run, ChainRun, key)`` as
    :meth:`ChainRun.load` reads them) on their probe outputs, so runs of different seeds meet where their weights
    never do: for the largest group of runs with one key (probe set and output coordinates), the fraction of its
    points in the largest connected set, the replicas' step rules, each run's metastable stages of training, the
    robustness of its sets and the transition along the first run's path (the ``chain_path_atlas`` figure into
    ``result``). Returns that summary (empty without runs)."""
    groups: dict[tuple[Any, ...], list[tuple[str, ChainRun]]] = {}
    for run, record, key in saved:
        groups.setdefault(key, []).append((run, record))
    if not groups:
        return {}
    group = max(groups.values(), key=lambda g: sum(len(r.replicas.features) for _, r in g))
    records = [record for _, record in group]
    chain, first = chain_of_runs(records, config, seed)
    info: dict[str, Any] = {"runs": [run for run, _ in group], "points": chain.points, "connected": chain.connected}
    # the replicas' step rules (lr, momentum): more than one makes the chain one of a mixture of dynamics
    info["step_rules"] = sorted({rule for record in records for rule in record.replicas.rules}, key=str)
    if chain.model is None:
        info["transition"] = {"none": str(chain.transition)}
        return info
    info["sets"] = len(chain.model.sets) or 1
    info["stages"] = dict(zip(info["runs"], stages_of(chain, records, first), strict=True))
    robustness = chain.robustness
    if robustness is not None:  # what survives other k-means seeds and state counts, and whether sets are metastable
        info["robustness"] = {
            "refits": [list(r) for r in robustness.refits],
            "set_agreement": robustness.agreement,
            "robust_sets": robustness.robust_sets(),
            "transition_agreement": robustness.transition,
            "metastable": robustness.metastable,
            "timescales_lags": robustness.timescales,
        }
    found = transition_of(chain)
    if "none" in found:
        info["transition"] = found
        return info
    from lightning_landscape.report.plots import path_atlas_figure

    result.figures["chain_path_atlas"] = path_atlas_figure(found)
    info["transition"] = {k: found[k] for k in TRANSITION_KEYS}
    return info
