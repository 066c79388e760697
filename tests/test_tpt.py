"""Transition path theory against an independent computation (linear solves in numpy) on known Markov chains,
and the slowest implied timescale of SGLD replicas on a double well against the exact one of its Smoluchowski
generator on a fine grid."""

import numpy as np
import pytest
import torch
from torch import nn

from lightning_landscape import Objective
from lightning_landscape.dynamics import markov_state_model, sample_basin
from lightning_landscape.dynamics.tpt import transition_paths


def reversible_chain(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A random reversible chain: ``T_ij = W_ij / sum_j W_ij`` for a symmetric ``W``; ``pi_i ~ sum_j W_ij``."""
    rng = np.random.default_rng(seed)
    w = rng.random((n, n)) * (rng.random((n, n)) < 0.6)
    w = w + w.T + np.diag(rng.random(n))
    return w / w.sum(1, keepdims=True), w.sum(1) / w.sum()


def committor(T: np.ndarray, a: list[int], b: list[int]) -> np.ndarray:
    """``q+``: 0 on A, 1 on B, ``q = T q`` elsewhere, by one linear solve."""
    n = len(T)
    inner = [i for i in range(n) if i not in a + b]
    q = np.zeros(n)
    q[b] = 1.0
    q[inner] = np.linalg.solve(np.eye(len(inner)) - T[np.ix_(inner, inner)], T[np.ix_(inner, b)].sum(1))
    return q


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_committors_flux_rate_and_mfpt_equal_the_linear_algebra(seed):
    T, pi = reversible_chain(8, seed)
    a, b = [0, 1], [7]
    paths = transition_paths(T, a, b, step=10.0)
    q_plus = committor(T, a, b)
    q_minus = 1 - q_plus  # reversible
    np.testing.assert_allclose(paths.forward_committor, q_plus, atol=1e-10)
    np.testing.assert_allclose(paths.backward_committor, q_minus, atol=1e-10)
    flux = pi[:, None] * q_minus[:, None] * T * q_plus[None, :]
    np.fill_diagonal(flux, 0)
    np.testing.assert_allclose(paths.net_flux, np.maximum(flux - flux.T, 0), atol=1e-12)
    total = flux[a].sum()  # everything reactive leaves A
    assert paths.total_flux == pytest.approx(total, rel=1e-9)
    assert paths.rate == pytest.approx(total / (pi * q_minus).sum() / 10.0, rel=1e-9)  # per step, 10 steps a lag
    assert paths.mfpt == pytest.approx(1 / paths.rate, rel=1e-9)
    assert sum(paths.shares) == pytest.approx(1.0, abs=0.011) and paths.shares == sorted(paths.shares, reverse=True)
    assert all(p[0] in a and p[-1] in b for p in paths.pathways)


def test_mfpt_from_one_state_is_the_mean_hitting_time():
    T, _ = reversible_chain(6, 3)
    paths = transition_paths(T, [0], [5])
    inner = list(range(5))
    hitting = np.linalg.solve(np.eye(5) - T[np.ix_(inner, inner)], np.ones(5))  # m = 1 + T m off B
    assert paths.mfpt == pytest.approx(hitting[0], rel=1e-9)


def test_two_channels_share_the_flux_as_their_conductances():
    # A=0 -> 1 -> 3=B (upper) and A=0 -> 2 -> 3 (lower); each channel is a series of two jumps, so its flux is
    # that of the jumps in series; the shares follow from the channel currents computed by hand
    k_up, k_low = 0.3, 0.1
    W = np.zeros((4, 4))
    W[0, 1] = W[1, 3] = k_up
    W[0, 2] = W[2, 3] = k_low
    W = W + W.T + np.diag([1.0, 0.5, 0.5, 1.0])
    T = W / W.sum(1, keepdims=True)
    paths = transition_paths(T, [0], [3])
    up, low = (paths.net_flux[0, k] for k in (1, 2))
    assert paths.pathways[0] == [0, 1, 3] and paths.pathways[1] == [0, 2, 3]
    np.testing.assert_allclose(paths.shares, [up / (up + low), low / (up + low)], rtol=1e-9)
    assert paths.shares[0] == pytest.approx(0.75, abs=0.01)  # equal jump weights per channel: k_up / (k_up + k_low)


def test_bad_sets_are_refused_naming_both():
    T, _ = reversible_chain(4, 0)
    with pytest.raises(ValueError, match="`source` \\[0, 1\\] and `target` \\[1\\] must be disjoint"):
        transition_paths(T, [0, 1], [1])
    with pytest.raises(ValueError, match="must be disjoint, non-empty"):
        transition_paths(T, [], [1])


def smoluchowski_timescale(potential, temperature: float, lo: float = -2.2, hi: float = 2.2, n: int = 1200) -> float:
    """The slowest relaxation time of dx = -U'(x) dt + sqrt(2T) dW: -1/lambda_2 of its generator on a fine grid
    (square-root approximation, Lie, Fackeldey & Weber 2013: Q_ij = T/h^2 sqrt(pi_j / pi_i) between neighbours)."""
    x = np.linspace(lo, hi, n)
    h = x[1] - x[0]
    log_pi = -potential(x) / temperature
    q = np.zeros((n, n))
    for i in range(n - 1):
        q[i, i + 1] = temperature / h**2 * np.exp(0.5 * (log_pi[i + 1] - log_pi[i]))
        q[i + 1, i] = temperature / h**2 * np.exp(0.5 * (log_pi[i] - log_pi[i + 1]))
    q -= np.diag(q.sum(1))
    sym = np.exp(0.5 * log_pi)[:, None] * q * np.exp(-0.5 * log_pi)[None, :]  # similar, symmetric
    eigenvalues = np.sort(np.linalg.eigvalsh(0.5 * (sym + sym.T)))[::-1]
    return -1.0 / eigenvalues[1]


def smoluchowski_tpt_mfpt(potential, temperature: float, core: float, lo: float = -2.2, hi: float = 2.2) -> float:
    """The TPT mean first-passage time (1 / k_AB) of the same generator from the core x < -core to x > core."""
    x = np.linspace(lo, hi, 1500)
    h = x[1] - x[0]
    log_pi = -potential(x) / temperature
    n = len(x)
    q = np.zeros((n, n))
    for i in range(n - 1):
        q[i, i + 1] = temperature / h**2 * np.exp(0.5 * (log_pi[i + 1] - log_pi[i]))
        q[i + 1, i] = temperature / h**2 * np.exp(0.5 * (log_pi[i] - log_pi[i + 1]))
    q -= np.diag(q.sum(1))
    pi = np.exp(log_pi - log_pi.max())
    pi /= pi.sum()
    a, b = x < -core, x > core
    inner = ~(a | b)
    plus = np.zeros(n)
    plus[b] = 1.0
    plus[inner] = np.linalg.solve(q[np.ix_(inner, inner)], -q[np.ix_(inner, b)].sum(1))
    flux = (pi[a][:, None] * q[np.ix_(a, ~a)] * plus[~a][None, :]).sum()
    return float((pi * (1 - plus)).sum() / flux)


@pytest.mark.parametrize("seed", [0, 1])
def test_sgld_double_well_slowest_timescale_matches_the_smoluchowski_generator(seed):
    lr, temperature = 0.01, 1 / 3
    well = Objective(
        nn.Linear(1, 1, bias=False).double(),
        [torch.zeros(1)],
        loss_fn=lambda m, _: (m.weight[0, 0] ** 2 - 1) ** 2,
        dtype=torch.float64,
    )
    record = 10
    runs = sample_basin(
        well,
        torch.tensor([-1.0], dtype=torch.float64),
        replicas=32,
        steps=8000,
        lr=lr,
        temperature=temperature,
        seed=seed,
        record_every=record,
    )
    bins = np.linspace(-1.6, 1.6, 17)
    dtrajs = [np.digitize(path[:, 0], bins) for path in runs.sketches]  # identity sketch: x itself
    lag = 20  # 200 steps, 2 time units: past the fast relaxation inside a well
    msm = markov_state_model(dtrajs, lag=lag)
    measured = msm.timescales[0] * record * lr  # in time units
    exact = smoluchowski_timescale(lambda x: (x**2 - 1) ** 2, temperature)
    assert measured == pytest.approx(exact, rel=0.2)
