"""The Markov state model of replicas, its metastable sets and transition path theory between them."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lightning_landscape.dynamics.msm import (
    MarkovStateModel,
    clustered_msm,
    metastable_summary,
    states_on_plane,
)
from lightning_landscape.dynamics.tpt import TransitionPaths, transition_paths
from lightning_landscape.energy.configs import MSMConfig


@dataclass
class MarkovModel:
    """A fitted MSM with its metastable sets (per-set means of the given values) and its states on the PCA plane."""

    msm: MarkovStateModel
    dtrajs: list[np.ndarray]
    sets: list[dict[str, float]]
    plane: tuple[np.ndarray, np.ndarray, float]


def markov_model(
    features: list[np.ndarray],
    config: MSMConfig,
    values: dict[str, list[np.ndarray]],
    seed: int = 0,
    plane_points: list[np.ndarray] | None = None,
) -> MarkovModel | None:
    """k-means on ``features`` (one ``(n_t, d)`` array per trajectory), a reversible MSM at ``config.lag``, PCCA+
    sets with the mean of each of ``values`` (one array per trajectory), and the states on the PCA plane of
    ``plane_points`` (default: the features). None while there are too few points."""
    fitted = clustered_msm(features, config.lag, config.n_clusters, config.max_metastable, seed)
    if fitted is None:
        return None
    msm, dtrajs = fitted
    sets = metastable_summary(msm, dtrajs, values)
    return MarkovModel(msm, dtrajs, sets, states_on_plane(plane_points or features, dtrajs, msm.active_set))


def transition_between(
    model: MarkovModel, first: tuple[int, int], last: tuple[int, int], step: float = 1.0, core: float = 0.9
) -> TransitionPaths | str:
    """Transition path theory of the MSM from the metastable set holding point ``first`` (``(trajectory, index)``,
    e.g. the training path's first point) to the set holding point ``last`` (e.g. the current point): committors,
    rate, mean first-passage time (``step``: steps per lag) and the dominant pathways
    (:func:`~lightning_landscape.dynamics.tpt.transition_paths`). A string saying why when there is no such
    transition (one metastable set, a point outside the largest connected set, both points in one set).

    The source and target are the sets' *cores*, the states whose PCCA+ membership in the set is at least
    ``core`` (the most certain state when none is): states on the barrier between two sets belong to neither, so
    recrossings of the boundary do not count as transitions (core-set MSMs; Buchete & Hummer 2008).

    Why 0.9: a rate between two regions is only defined, and only estimable from points recorded one lag apart,
    when the regions are separated by a transition region wider than a lag's displacement. Cores that reach into
    that region (membership >= 0.75: a third of all states on the three-hole potential) have a reference rate
    twice the sampled one, because a continuous path recrosses between such cores many times within a lag; a
    single-state core is too small to be found again within a lag (rate 35-60% low, counted directly from the
    recorded points as well as from the MSM). At 0.9, with 50 and 100 k-means states, the TPT rate at lag 1 is
    within 12% of the fine-grid reference between the same regions and the upper channel's share of the flux within
    10% (``tests/dynamics/test_tpt.py``, 3 seeds)."""
    msm = model.msm
    if msm.metastable_assignment is None:
        return "the chain has a single metastable set"
    index = {int(s): k for k, s in enumerate(msm.active_set)}
    a, b = (index.get(int(model.dtrajs[t][i])) for t, i in (first, last))
    if a is None or b is None:
        return "the initial or the current point lies outside the chain's largest connected set"
    start, end = int(msm.metastable_assignment[a]), int(msm.metastable_assignment[b])
    if start == end:
        return f"the initial and the current point are in one metastable set ({start})"
    members = msm.metastable_memberships
    if members is None:  # no fuzzy memberships: the whole sets
        source, target = (np.flatnonzero(msm.metastable_assignment == k) for k in (start, end))
    else:
        source, target = (np.flatnonzero(members[:, k] >= min(core, members[:, k].max())) for k in (start, end))
    found = transition_paths(msm.transition_matrix, source, target, msm.stationary_distribution, step=step)
    found.sets = (start, end)  # a core taken as the most certain state may be assigned to another set
    return found


#: what a summary reports of a transition (:func:`transition_summary`)
TRANSITION_KEYS = ("source_set", "target_set", "rate_per_step", "mfpt_steps", "pathways")


def transition_summary(model: MarkovModel, found: TransitionPaths) -> dict[str, Any]:
    """What a transition says at the level of metastable sets: ``source_set``, ``target_set``, ``rate_per_step``,
    ``mfpt_steps``, ``set_flux`` (the net reactive flux between sets: the states' net flux summed over set
    boundaries, which keeps flux conservation), ``pathways`` (that network decomposed into set sequences by
    the largest bottleneck, as the state pathways are: ``{"sets", "share"}``, largest first, shares of the total
    flux), ``positions`` (each set's mean position on the MSM's plane, weighted by stationary probability and PCCA+
    membership), ``populations`` and
    ``set_losses`` (each set's mean loss), for reports and the path atlas
    (:func:`~lightning_landscape.report.plots.path_atlas_figure`)."""
    from deeptime.markov.tools.flux.api import pathways
    from scipy.sparse import csr_matrix

    msm = model.msm
    assignment = msm.metastable_assignment
    memberships = msm.metastable_memberships
    n_sets = memberships.shape[1] if memberships is not None else int(assignment.max()) + 1  # a set may own no state
    flux = np.zeros((n_sets, n_sets))
    for i, j in zip(*np.nonzero(found.net_flux), strict=True):
        if assignment[i] != assignment[j]:
            flux[assignment[i], assignment[j]] += found.net_flux[i, j]
    net = np.maximum(flux - flux.T, 0)
    source, target = found.sets or (int(assignment[found.source[0]]), int(assignment[found.target[0]]))
    with warnings.catch_warnings():  # a handful of sets: the decomposition ends long before its limit
        warnings.filterwarnings("ignore", "Maximum number of iterations", RuntimeWarning)
        channels, capacities = pathways(csr_matrix(net), [source], [target], fraction=0.999, maxiter=100)
    total = net[source].sum()
    order = np.argsort(capacities)[::-1]
    # membership-weighted: a PCCA+ set that is no state's most likely set still has a place
    centers = model.plane[0]
    weights = msm.stationary_distribution[:, None] * (
        memberships if memberships is not None else np.eye(n_sets)[assignment]
    )
    return {
        "populations": msm.metastable_populations,
        "set_losses": np.asarray([row.get("mean_loss", np.nan) for row in model.sets]),
        "source_set": source,
        "target_set": target,
        "rate_per_step": found.rate,
        "mfpt_steps": found.mfpt,
        "pathways": [
            {"sets": [int(k) for k in channels[n]], "share": float(capacities[n] / total) if total > 0 else 0.0}
            for n in order
        ],
        "set_flux": net,
        "positions": (weights.T @ centers) / np.maximum(weights.sum(0), np.finfo(float).tiny)[:, None],
    }


def sketch_basis(meta: dict[str, Any]) -> tuple[Any, ...]:
    """What trajectory stores must share for one Markov model of their sketches: sketch size, projection seed,
    non-zeros per column and parameter count."""
    size = meta.get("n_params") or sum(int(np.prod(s)) for s in meta.get("shapes", []))
    return meta.get("k"), meta.get("projection_seed"), meta.get("nnz"), size


def model_of_stores(stores: list[Any], config: MSMConfig, seed: int, result: Any) -> dict[str, Any]:
    """The Markov model of the sketches of the largest group of trajectory ``stores`` that share a
    :func:`sketch_basis` (training trajectories and replicas of several runs): its figures, sets and arrays into
    ``result`` (:class:`~lightning_landscape.energy.EnergyResult`), and the transition of the longest training
    trajectory (from its first point's set to its last's). Returns the summary: trajectories, points, connected
    fraction (in words when below 0.9), slowest timescale, sets, transition."""
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for store in stores:
        if len(store.sketches) > 2 * config.lag:
            groups.setdefault(sketch_basis(store.meta), []).append(store)
    if not groups:
        return {}
    group = max(groups.values(), key=lambda g: sum(len(s.sketches) for s in g))
    sketches = [s.sketches.astype(np.float64) for s in group]
    losses = [s.stats.get("loss", np.full(len(s.steps), np.nan))[np.isin(s.steps, s.sketch_steps)] for s in group]
    fitted = markov_model(sketches, config, {"loss": losses}, seed)
    summary: dict[str, Any] = {
        "trajectories": len(group),
        "points": int(sum(len(s) for s in sketches)),
        "skipped_trajectories": sum(len(g) for g in groups.values()) - len(group),
    }
    if fitted is None:
        return summary
    msm = fitted.msm
    summary.update(
        slowest_timescale=float(msm.timescales[0]) if len(msm.timescales) else None,
        metastable_states=len(fitted.sets) or 1,
        active_states=len(msm.active_set),
        # points in the largest connected set: runs or triggers that never meet in sketch space are apart
        active_points=int(sum(np.isin(d, msm.active_set).sum() for d in fitted.dtrajs)),
    )
    summary["connected"] = summary["active_points"] / summary["points"]
    if summary["connected"] < 0.9:
        summary["disconnected"] = (
            f"only {summary['connected']:.0%} of the points lie in the largest connected set of this MSM (on the"
            " parameter sketches): trajectories that never meet in parameter space (other seeds, the replicas of other"
            " triggers) stay apart, so its sets, timescales and transition describe that set alone. summary['chain']"
            " (runs with EnergyLandscape) joins them on their probe outputs, where permuted copies of one function"
            " meet."
        )
    result.add_markov(fitted, 1, "recorded points")
    training = [k for k, s in enumerate(group) if "excursions" not in Path(s.path).parts]
    if training:  # the longest training path: how it went from its first metastable set to its last
        k = max(training, key=lambda i: len(sketches[i]))
        spacing = float(np.median(np.diff(group[k].sketch_steps))) if len(sketches[k]) > 1 else 1.0
        found = transition_between(fitted, (k, 0), (k, len(fitted.dtrajs[k]) - 1), config.lag * spacing)
        if isinstance(found, str):
            summary["transition"] = {"none": found}
        else:
            described = transition_summary(fitted, found)
            result.add_transition(described, "path_atlas", fitted.plane[1])
            result.arrays.update(forward_committor=found.forward_committor, net_flux=found.net_flux)
            summary["transition"] = {key: described[key] for key in TRANSITION_KEYS}
    return summary
