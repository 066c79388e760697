"""Markov state models of discretized trajectories (the clustering, counting and estimation are deeptime's).

Given discrete trajectories ``s_0, s_1, ...`` (cluster indices of, e.g., sketch coordinates or outputs on
the probe set along many SGD/SGLD runs), an MSM at lag ``tau`` is the transition matrix ``T(tau)`` with
``T_ij = P(s_{t+tau} = j | s_t = i)``, estimated by reversible maximum likelihood on the largest connected
set of the sliding-window counts (deeptime's ``TransitionCountEstimator`` and ``MaximumLikelihoodMSM``;
Prinz et al. 2011). From it:

* stationary distribution ``pi`` (``pi T = pi``) and free energy ``F_i = -log pi_i`` (in units of the
  noise temperature);
* implied timescales ``t_k(tau) = -tau / ln |lambda_k(tau)|``: constant in ``tau`` when the model is
  Markovian; their plateau tells the slowest processes (basin hops);
* Chapman-Kolmogorov test: ``T(tau)^k`` against ``T(k tau)`` estimated directly; small differences mean
  the model predicts long times from short ones;
* PCCA+ metastable sets (Roeblitz & Weber 2013) and their populations.

Example::

    >>> import numpy as np
    >>> P = np.array([[0.9, 0.1], [0.2, 0.8]])
    >>> rng = np.random.default_rng(0)
    >>> s = [0]
    >>> for _ in range(20000):
    ...     s.append(rng.choice(2, p=P[s[-1]]))
    >>> msm = markov_state_model([np.array(s)], lag=1)
    >>> np.round(msm.transition_matrix, 1).tolist(), np.round(msm.stationary_distribution, 1).tolist()
    ([[0.9, 0.1], [0.2, 0.8]], [0.7, 0.3])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class MarkovStateModel:
    """An MSM at one lag time with its diagnostics (states are indices into ``active_set``)."""

    lag: int
    transition_matrix: np.ndarray
    stationary_distribution: np.ndarray
    free_energy: np.ndarray
    active_set: np.ndarray
    timescales: np.ndarray
    its_lags: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    implied_timescales: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    ck_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    ck_error: np.ndarray = field(default_factory=lambda: np.zeros(0))
    metastable_assignment: np.ndarray | None = None
    metastable_populations: np.ndarray | None = None
    metastable_memberships: np.ndarray | None = None  # (states, sets): PCCA+'s fuzzy membership of each state


def _fit(dtrajs: Sequence[np.ndarray], lag: int):
    from deeptime.markov import TransitionCountEstimator
    from deeptime.markov.msm import MaximumLikelihoodMSM

    counts = TransitionCountEstimator(lagtime=lag, count_mode="sliding").fit(list(dtrajs)).fetch_model()
    counts = counts.submodel_largest()
    return MaximumLikelihoodMSM(reversible=True).fit(counts).fetch_model()


def markov_state_model(
    dtrajs: Sequence[np.ndarray],
    lag: int,
    *,
    n_timescales: int = 3,
    its_lags: Sequence[int] | None = None,
    ck_steps: int = 4,
    n_metastable: int | None = None,
) -> MarkovStateModel:
    """Estimate a reversible MSM at ``lag`` from discrete trajectories, with implied timescales over
    ``its_lags`` (default: a few multiples of ``lag``), a Chapman-Kolmogorov test over ``ck_steps`` multiples,
    and PCCA+ into ``n_metastable`` sets. The model at ``lag`` must exist; a longer lag whose counts support no
    model (deeptime: "None of the strongly connected subsets could be fit") leaves NaN timescales for that lag and
    no Chapman-Kolmogorov entry, rather than voiding the model.

    Raises:
        ValueError: for a non-positive ``lag`` or trajectories shorter than it.
    """
    dtrajs = [np.asarray(d, dtype=np.int64) for d in dtrajs]
    if lag < 1:
        raise ValueError(f"`lag` must be a positive integer, got {lag}.")
    if not dtrajs or max(len(d) for d in dtrajs) <= lag:
        raise ValueError(f"the trajectories must be longer than `lag` ({lag}). HINT: record longer runs or lower lag.")
    msm = _fit(dtrajs, lag)
    pi = np.asarray(msm.stationary_distribution)
    k = min(n_timescales, msm.n_states - 1)
    lags = np.asarray(its_lags if its_lags is not None else [lag * m for m in (1, 2, 3, 5)], dtype=int)
    lags = lags[lags < max(len(d) for d in dtrajs)]
    its = np.full((len(lags), k), np.nan)
    for row, tau in enumerate(lags):
        try:  # at a longer lag the counts may no longer support a model: that lag's timescales stay NaN
            model = _fit(dtrajs, int(tau))
        except (ValueError, RuntimeError):
            continue
        values = np.asarray(model.timescales(k))
        its[row, : len(values)] = values
    steps, errors = [], []
    T = np.asarray(msm.transition_matrix)
    for m in range(2, ck_steps + 1):
        if lag * m >= max(len(d) for d in dtrajs):
            break
        try:
            direct = _fit(dtrajs, lag * m)
        except (ValueError, RuntimeError):
            continue
        if not np.array_equal(direct.count_model.state_symbols, msm.count_model.state_symbols):
            continue  # a different connected set: not comparable
        steps.append(m)
        errors.append(float(np.abs(np.linalg.matrix_power(T, m) - np.asarray(direct.transition_matrix)).max()))
    assignment = populations = memberships = None
    if n_metastable is not None and 1 < n_metastable <= msm.n_states:
        pcca = msm.pcca(n_metastable)
        assignment = np.asarray(pcca.assignments)
        populations = np.asarray(pcca.coarse_grained_stationary_probability)
        memberships = np.asarray(pcca.memberships)
    return MarkovStateModel(
        lag=lag,
        transition_matrix=T,
        stationary_distribution=pi,
        free_energy=-np.log(pi),
        active_set=np.asarray(msm.count_model.state_symbols),
        timescales=np.asarray(msm.timescales(k)),
        its_lags=lags,
        implied_timescales=its,
        ck_steps=np.asarray(steps, dtype=int),
        ck_error=np.asarray(errors),
        metastable_assignment=assignment,
        metastable_populations=populations,
        metastable_memberships=memberships,
    )


def discretize(features: Sequence[np.ndarray], n_clusters: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """k-means (deeptime) on the rows of all trajectories together: (discrete trajectories, cluster centers)."""
    from deeptime.clustering import KMeans

    rows = np.concatenate([np.asarray(f, dtype=np.float64) for f in features])
    model = KMeans(n_clusters=n_clusters, fixed_seed=seed, max_iter=200).fit(rows).fetch_model()
    return [model.transform(np.asarray(f, dtype=np.float64)) for f in features], np.asarray(model.cluster_centers)


def metastable_count(eigenvalues: np.ndarray, max_sets: int = 5) -> int:
    """The number of metastable sets suggested by the largest gap among the leading eigenvalues of ``T``:
    ``m = argmax_{2 <= m <= max_sets} (lambda_m - lambda_{m+1})`` (eigenvalues sorted by decreasing modulus,
    ``lambda_1 = 1``); a clear gap after ``m`` eigenvalues means ``m`` slow sets and fast mixing inside them.

    Example::

        >>> metastable_count(np.array([1.0, 0.98, 0.97, 0.2, 0.1]))
        3
    """
    values = np.sort(np.abs(np.asarray(eigenvalues, dtype=float)))[::-1]
    if len(values) < 3:
        return len(values)
    top = min(max_sets, len(values) - 1)
    gaps = values[1:top] - values[2 : top + 1]  # gap after m = 2 .. top eigenvalues
    return int(np.argmax(gaps)) + 2


def default_clusters(n_points: int) -> int:
    """The number of k-means states when none is given: one per 20 points, 2 to 50."""
    return int(np.clip(n_points // 20, 2, 50))


def set_labels(msm: MarkovStateModel, states: np.ndarray) -> np.ndarray:
    """The metastable set of each of ``states`` (cluster indices): -1 outside the largest connected set, 0 inside
    it when the model has no PCCA+ sets.

    Example::

        >>> msm = MarkovStateModel(1, np.eye(2), np.full(2, 0.5), np.zeros(2), np.array([3, 5]), np.zeros(1),
        ...                        metastable_assignment=np.array([1, 0]))
        >>> set_labels(msm, np.array([5, 4, 3])).tolist()
        [0, -1, 1]
    """
    states = np.asarray(states, dtype=np.int64).reshape(-1)
    active = np.asarray(msm.active_set, dtype=np.int64)
    lookup = np.full(int(max(states.max(initial=-1), active.max(initial=-1))) + 1, -1)
    inside = np.asarray(msm.metastable_assignment) if msm.metastable_assignment is not None else 0
    lookup[active] = inside
    return lookup[states]


def clustered_msm(
    features: Sequence[np.ndarray],
    lag: int,
    n_clusters: int | None = None,
    max_metastable: int = 4,
    seed: int = 0,
) -> tuple[MarkovStateModel, list[np.ndarray]] | None:
    """The whole pipeline on point clouds (one ``(n_t, d)`` array per trajectory): k-means into ``n_clusters``
    states (default: one per 20 points, 2 to 50), a reversible MSM at ``lag``, and PCCA+ into the number of sets
    at the largest eigenvalue gap (:func:`metastable_count`). Returns ``(msm, discrete trajectories)``, or None
    while there are too few points (fewer than two per state, or trajectories not longer than ``2 lag``)."""
    features = [np.asarray(f, dtype=np.float64) for f in features if len(f)]
    n_points = sum(len(f) for f in features)
    n_clusters = n_clusters or default_clusters(n_points)
    if not features or n_points < 2 * n_clusters or max(len(f) for f in features) <= 2 * lag:
        return None
    dtrajs, _ = discretize(features, n_clusters, seed=seed)
    msm = markov_state_model(dtrajs, lag)
    eigenvalues = np.linalg.eigvals(msm.transition_matrix)
    n_sets = metastable_count(eigenvalues, max_metastable)
    if 1 < n_sets <= len(msm.active_set):
        msm = markov_state_model(dtrajs, lag, n_metastable=n_sets)
    return msm, dtrajs


def metastable_summary(
    msm: MarkovStateModel, dtrajs: Sequence[np.ndarray], values: dict[str, Sequence[np.ndarray]]
) -> list[dict[str, float]]:
    """Per PCCA+ set: its population, the number of sampled points in it, and the mean of each per-point value
    (e.g. ``{"loss": [...], "accuracy": [...]}``, one array per trajectory; NaNs ignored)."""
    if msm.metastable_assignment is None:
        return []
    labels = set_labels(msm, np.concatenate([np.asarray(d) for d in dtrajs]))
    flat = {name: np.concatenate([np.asarray(v, dtype=float) for v in arrays]) for name, arrays in values.items()}
    rows = []
    for k, population in enumerate(msm.metastable_populations):
        members = labels == k
        row = {"set": k, "population": float(population), "points": int(members.sum())}
        for name, v in flat.items():
            chosen = v[members]
            row[f"mean_{name}"] = float(np.nanmean(chosen)) if np.isfinite(chosen).any() else float("nan")
        rows.append(row)
    return rows


def states_on_plane(
    points: Sequence[np.ndarray], dtrajs: Sequence[np.ndarray], active_set: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """The 2-D PCA plane of all points: (each active state's mean point, every point, explained variance ratio)."""
    stacked = np.concatenate([np.asarray(p, dtype=np.float64) for p in points])
    labels = np.concatenate(dtrajs)
    mean = stacked.mean(0)
    _, sv, vt = np.linalg.svd(stacked - mean, full_matrices=False)
    explained = float((sv[:2] ** 2).sum() / max((sv**2).sum(), 1e-30))
    basis = vt[:2].T
    centers = np.stack([stacked[labels == s].mean(0) for s in active_set])
    return (centers - mean) @ basis, (stacked - mean) @ basis, explained
