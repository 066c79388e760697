"""Markov state models against a known chain; disconnectivity trees against a known barrier matrix."""

import numpy as np
import pytest

from lightning_landscape.dynamics.disconnectivity import disconnectivity_figure, disconnectivity_tree
from lightning_landscape.dynamics.msm import discretize, markov_state_model

# two metastable pairs {0, 1} and {2, 3}: fast inside a pair, slow between them; reversible (detailed balance)
P = np.array(
    [
        [0.70, 0.28, 0.02, 0.00],
        [0.28, 0.70, 0.00, 0.02],
        [0.02, 0.00, 0.70, 0.28],
        [0.00, 0.02, 0.28, 0.70],
    ]
)


def simulate(P, n, seed):
    rng = np.random.default_rng(seed)
    cumulative = P.cumsum(1)
    s = np.empty(n, dtype=np.int64)
    s[0] = 0
    u = rng.random(n)
    for t in range(1, n):
        s[t] = min(np.searchsorted(cumulative[s[t - 1]], u[t]), len(P) - 1)
    return s


@pytest.fixture(scope="module")
def msm():
    trajectories = [simulate(P, 50_000, seed) for seed in range(4)]
    return markov_state_model(trajectories, lag=1, n_metastable=2, its_lags=[1, 2, 4], ck_steps=3)


def test_msm_recovers_the_known_chain(msm):
    n = 4 * 50_000
    # binomial standard error of each row's estimate, with the row's visit count about n * pi_i = n / 4
    se = np.sqrt(P * (1 - P) / (n / 4))
    assert np.all(np.abs(msm.transition_matrix - P) <= 5 * se + 1e-12)
    np.testing.assert_allclose(msm.stationary_distribution, np.full(4, 0.25), atol=0.02)
    np.testing.assert_allclose(msm.free_energy, -np.log(msm.stationary_distribution))
    exact = np.sort(np.abs(np.linalg.eigvals(P)))[::-1][1:4]
    np.testing.assert_allclose(msm.timescales, -1 / np.log(exact), rtol=0.05)


def test_implied_timescales_are_flat_for_a_markov_chain_and_ck_holds(msm):
    slowest = msm.implied_timescales[:, 0]
    assert msm.its_lags.tolist() == [1, 2, 4]
    np.testing.assert_allclose(slowest, slowest[0], rtol=0.05)  # Markovian: independent of the lag
    assert msm.ck_steps.tolist() == [2, 3] and np.all(msm.ck_error < 0.02)


def test_pcca_finds_the_two_metastable_pairs(msm):
    sets = msm.metastable_assignment
    assert sets[0] == sets[1] and sets[2] == sets[3] and sets[0] != sets[2]
    np.testing.assert_allclose(msm.metastable_populations, [0.5, 0.5], atol=0.03)


def test_discretize_clusters_points_of_several_runs_together():
    rng = np.random.default_rng(0)
    runs = [rng.normal(size=(200, 2)) + c for c in ([0, 0], [10, 10])]
    dtrajs, centers = discretize(runs, n_clusters=2)
    assert len(set(dtrajs[0])) == 1 and len(set(dtrajs[1])) == 1 and dtrajs[0][0] != dtrajs[1][0]
    assert centers.shape == (2, 2)
    with pytest.raises(ValueError, match="longer than `lag`"):
        markov_state_model([np.array([0, 1])], lag=5)


def test_disconnectivity_tree_merges_at_the_minimax_saddles():
    minima = np.array([0.0, 1.0, 2.0, 0.5])
    saddles = np.full((4, 4), np.inf)
    for (i, j), level in {(0, 1): 3.0, (2, 3): 4.0, (1, 2): 6.0, (0, 3): 5.0}.items():
        saddles[i, j] = saddles[j, i] = level
    tree = disconnectivity_tree(minima, saddles)
    # {0,1} at 3, {2,3} at 4, and the two basins at min(5, 6) = 5: the lowest chain between them
    assert tree.merge_levels.tolist() == [3.0, 4.0, 5.0]
    fig = disconnectivity_figure(tree)
    assert fig.axes[0].get_ylabel() == "loss" and len(fig.axes[0].lines) >= 3 + 4
    with pytest.raises(ValueError, match="below one of the minima"):
        disconnectivity_tree(minima, np.where(np.isfinite(saddles), -1.0, saddles))


def test_a_longer_lag_without_a_model_leaves_nan_timescales_instead_of_voiding_the_msm():
    # at lag 1 a pair of states is connected both ways; at lag 2 no set is strongly connected
    msm = markov_state_model([np.array([0, 1, 0, 1, 0, 1, 0, 2, 3, 2])], lag=1)
    assert len(msm.active_set) == 2 and np.allclose(msm.transition_matrix, [[0, 1], [1, 0]])
    failed = [tau for tau, row in zip(msm.its_lags, msm.implied_timescales, strict=True) if np.isnan(row).all()]
    assert failed  # those lags are reported as missing, not raised
