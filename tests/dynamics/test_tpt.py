"""Transition path theory against an independent computation (linear solves in numpy) on known Markov chains,
and the slowest implied timescale of SGLD replicas on a double well against the exact one of its Smoluchowski
generator on a fine grid."""

import functools

import numpy as np
import pytest
import torch
from torch import nn

from lightning_landscape import Objective
from lightning_landscape.dynamics import markov_state_model, sample_basin
from lightning_landscape.dynamics.tpt import transition_paths
from tests.potentials import smoluchowski_timescale


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


def test_a_set_that_owns_no_state_still_gets_a_place_and_its_flux_row():
    """PCCA+ can return a set that is no state's most likely one (seen on the digits study): the set-level summary
    keeps all sets, placing each at its membership- and stationary-weighted mean position."""
    from types import SimpleNamespace

    from lightning_landscape.energy import transition_summary

    T, pi = reversible_chain(4, 0)
    found = transition_paths(T, [0], [3], pi)
    found.sets = (0, 1)
    memberships = np.array([[0.7, 0.0, 0.3], [0.6, 0.1, 0.3], [0.1, 0.6, 0.3], [0.0, 0.7, 0.3]])
    msm = SimpleNamespace(
        metastable_assignment=memberships.argmax(1),  # set 2 is nowhere the largest
        metastable_memberships=memberships,
        metastable_populations=memberships.T @ pi,
        stationary_distribution=pi,
    )
    centers = np.arange(8.0).reshape(4, 2)
    model = SimpleNamespace(msm=msm, plane=(centers,), sets=[{"mean_loss": 1.0}] * 3)
    summary = transition_summary(model, found)
    assert summary["set_flux"].shape == (3, 3) and summary["positions"].shape == (3, 2)
    weights = pi[:, None] * memberships
    np.testing.assert_allclose(summary["positions"], weights.T @ centers / weights.sum(0)[:, None], rtol=1e-12)
    np.testing.assert_allclose(summary["positions"][2], pi @ centers, rtol=1e-12)  # uniform membership: the mean
    assert summary["pathways"][0]["sets"] == [0, 1]


def test_bad_sets_are_refused_naming_both():
    T, _ = reversible_chain(4, 0)
    with pytest.raises(ValueError, match="`source` \\[0, 1\\] and `target` \\[1\\] must be disjoint"):
        transition_paths(T, [0, 1], [1])
    with pytest.raises(ValueError, match="must be disjoint, non-empty"):
        transition_paths(T, [], [1])


@pytest.mark.slow
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


def three_hole(x, y, exp=np.exp):
    """The three-hole potential of TPT papers (Metzner, Schuette & Vanden-Eijnden 2006): deep wells at (+-1, 0), a
    shallow one at (0, 1.5); from the left well to the right one a lower channel (through the saddle near the
    origin) and an upper one (through the shallow well)."""
    return (
        3 * exp(-(x**2) - (y - 1 / 3) ** 2)
        - 3 * exp(-(x**2) - (y - 5 / 3) ** 2)
        - 5 * exp(-((x - 1) ** 2) - y**2)
        - 5 * exp(-((x + 1) ** 2) - y**2)
        + 0.2 * x**4
        + 0.2 * (y - 1 / 3) ** 4
    )


CORE, SPLIT = 0.25, 0.75  # cores: squares |x -+ 1|, |y| < CORE; the upper channel crosses x = 0 above y = SPLIT
LR, TEMPERATURE, RECORD = 0.02, 1.0, 5  # SGLD on the three-hole potential: 0.1 time units between recorded points


def square_cores(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (np.abs(x + 1) < CORE) & (np.abs(y) < CORE), (np.abs(x - 1) < CORE) & (np.abs(y) < CORE)


def three_hole_reference(cores=square_cores, temperature: float = TEMPERATURE, n: int = 161) -> dict[str, float]:
    """TPT of dx = -grad U dt + sqrt(2T) dW on a fine grid (square-root approximation of the generator, 2-D)
    between the regions ``cores(x, y) -> (in_a, in_b)``: the rate ``F / sum pi q-`` (per time unit) and the upper
    channel's share of the net reactive flux across x = 0; and the Boltzmann weights of x < 0 and y > 1 by
    midpoint quadrature on a finer grid."""
    from scipy import sparse
    from scipy.sparse.linalg import spsolve

    xs, ys = np.linspace(-2.5, 2.5, n), np.linspace(-2.0, 3.0, n)
    h = xs[1] - xs[0]
    x, y = (g.ravel() for g in np.meshgrid(xs, ys, indexing="ij"))
    u = three_hole(x, y)
    grid = np.arange(n * n).reshape(n, n)
    pairs = [(grid[:-1].ravel(), grid[1:].ravel()), (grid[:, :-1].ravel(), grid[:, 1:].ravel())]
    i = np.concatenate([p for a, b in pairs for p in (a, b)])
    j = np.concatenate([p for a, b in pairs for p in (b, a)])
    rates = temperature / h**2 * np.exp(-(u[j] - u[i]) / (2 * temperature))
    q = sparse.csr_matrix((rates, (i, j)), shape=(n * n, n * n))
    q = (q - sparse.diags(np.asarray(q.sum(1)).ravel())).tocsr()
    pi = np.exp(-(u - u.min()) / temperature)
    pi /= pi.sum()
    a, b = cores(x, y)
    inner = ~(a | b)
    plus = b.astype(float)
    plus[inner] = spsolve(q[inner][:, inner].tocsc(), -np.asarray(q[inner][:, b].sum(1)).ravel())
    flux = pi[i] * (1 - plus[i]) * rates * plus[j]  # reactive flux of each jump
    across = np.where((x[i] < 0) & (x[j] >= 0), 1.0, np.where((x[i] >= 0) & (x[j] < 0), -1.0, 0.0)) * flux
    mid_x, mid_y = np.meshgrid(np.arange(-2.5, 2.5, 1e-3) + 5e-4, np.arange(-2.0, 3.0, 1e-3) + 5e-4, indexing="ij")
    weight = np.exp(-(three_hole(mid_x, mid_y) - u.min()) / temperature)
    return {
        "upper_share": across[y[i] > SPLIT].sum() / across.sum(),
        "rate": flux[a[i] & ~a[j]].sum() / (pi * (1 - plus)).sum(),
        "left": weight[mid_x < 0].sum() / weight.sum(),
        "top": weight[mid_y > 1.0].sum() / weight.sum(),
    }


@functools.cache  # the share, population and chain tests read one sample per seed
def three_hole_replicas(seed: int) -> tuple[np.ndarray, ...]:
    """128 SGLD replicas of 5000 steps, half from each deep well, every 5th point: ``(1001, 2)`` each."""
    potential = Objective(
        nn.Linear(2, 1, bias=False).double(),
        [torch.zeros(1)],
        loss_fn=lambda m, _: three_hole(m.weight[0, 0], m.weight[0, 1], torch.exp),
        dtype=torch.float64,
        chunk_size=128,
    )
    starts = torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64).repeat(64, 1)
    runs = sample_basin(
        potential, starts, replicas=128, steps=5000, lr=LR, temperature=TEMPERATURE, seed=seed, record_every=RECORD
    )
    return tuple(runs.sketches)  # identity sketch: (x, y) itself


def net_flux_shares(net_flux: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """The upper channel's share of the net flux from states left of x = 0 to states right of it (states at
    ``(x, y)``; a jump is in the upper channel when its midpoint is above SPLIT)."""
    across = (net_flux - net_flux.T) * ((x[:, None] < 0) & (x[None, :] >= 0))
    upper = (y[:, None] + y[None, :]) / 2 > SPLIT
    return float(across[upper].sum() / across.sum())


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_sgld_three_hole_flux_shares_and_populations_match_the_fine_grid(seed):
    # SGLD replicas (half from each deep well) -> 0.25-wide cells -> MSM at the shortest lag (0.1 time units: a
    # lag-tau jump skips where the path crossed, so the channels blur as tau grows) -> TPT between the wells' cores
    edges_x, edges_y = np.linspace(-2.5, 2.5, 21), np.linspace(-2.0, 3.0, 21)
    rows = len(edges_y) - 1
    cells = [
        np.clip(np.digitize(p[:, 0], edges_x) - 1, 0, len(edges_x) - 2) * rows
        + np.clip(np.digitize(p[:, 1], edges_y) - 1, 0, rows - 1)
        for p in three_hole_replicas(seed)
    ]
    msm = markov_state_model(cells, lag=1, its_lags=[1], ck_steps=1)
    centers_x, centers_y = (edges_x[:-1] + edges_x[1:]) / 2, (edges_y[:-1] + edges_y[1:]) / 2
    x, y = centers_x[msm.active_set // rows], centers_y[msm.active_set % rows]
    in_a, in_b = square_cores(x, y)
    a, b = np.flatnonzero(in_a), np.flatnonzero(in_b)
    assert len(a) == len(b) == 4
    flux = transition_paths(msm.transition_matrix, a, b, msm.stationary_distribution).net_flux
    exact = three_hole_reference()
    assert net_flux_shares(flux, x, y) == pytest.approx(exact["upper_share"], rel=0.1)
    # populations: the shallow well within 15% (Euler-Maruyama at this lr overweights it by 2%, measured against
    # lr/4 with 4000 particles, beside the statistical error of its slow exchange); the deep wells' split within 5%
    pi = msm.stationary_distribution
    assert pi[x < 0].sum() == pytest.approx(exact["left"], rel=0.05)
    assert pi[y > 1.0].sum() == pytest.approx(exact["top"], rel=0.15)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_chains_transition_rate_and_channel_split_match_the_fine_grid_between_its_own_cores(seed):
    from scipy.spatial import cKDTree

    from lightning_landscape.energy import MSMConfig, chain_of

    # the whole chain at its defaults (k-means states, lag 1, PCCA+ sets, cores of membership >= 0.9) from the
    # left well's first point to the right well's; the reference is the fine grid's TPT between the same regions
    # (each grid point in the state of its nearest recorded point)
    replicas = list(three_hole_replicas(seed))
    values = {"loss": [three_hole(r[:, 0], r[:, 1]) for r in replicas]}
    chain = chain_of(replicas, values, [(0, 0)], [(1, 0)], MSMConfig(refit_seeds=1, refit_counts=1), seed, LR * RECORD)
    found = chain.transition
    assert not isinstance(found, str), found
    states = chain.model.msm.active_set
    points, labels = np.concatenate(replicas), np.concatenate(chain.model.dtrajs)
    nearest = cKDTree(points)

    def cores(x, y):
        label = labels[nearest.query(np.stack([x, y], 1))[1]]
        return np.isin(label, states[found.source]), np.isin(label, states[found.target])

    exact = three_hole_reference(cores)
    assert found.rate == pytest.approx(exact["rate"], rel=0.15)
    x, y = (np.array([points[labels == s, k].mean() for s in states]) for k in (0, 1))
    assert net_flux_shares(found.net_flux, x, y) == pytest.approx(exact["upper_share"], rel=0.1)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_chain_starts_from_the_first_training_point_inside_its_connected_set(seed):
    from lightning_landscape.energy import MSMConfig, chain_of

    # replicas of a known 2-state chain (stay 0.95), each state a cloud of features; the "training path" starts
    # far from every cloud (no replica comes near: outside the connected set), enters state 0, then 1, and ends far
    # again (as the current point does while the loss still falls); located, one point each
    rng = np.random.default_rng(seed)
    P = np.array([[0.95, 0.05], [0.05, 0.95]])
    centers = np.array([[0.0, 0.0], [10.0, 0.0]])
    replicas, states = [], []
    for _ in range(20):
        s = [int(rng.integers(2))]
        for _ in range(199):
            s.append(int(rng.choice(2, p=P[s[-1]])))
        replicas.append(centers[s] + 0.1 * rng.standard_normal((200, 2)))
        states.append(np.asarray(s))
    path = [np.array([[100.0, 100.0]]), centers[[0]] + 0.05, centers[[1]] + 0.05, np.array([[-100.0, 100.0]])]
    trajectories = replicas + path
    values = {"loss": [np.zeros(len(t)) for t in trajectories]}
    sources = [(20, 0), (21, 0), (22, 0)]
    chain = chain_of(trajectories, values, sources, [*sources, (23, 0)], MSMConfig(n_clusters=7), seed=seed)
    assert chain.source == (21, 0)  # the initial point is outside; the first stage inside is state 0's set
    assert chain.target == (22, 0)  # the "current" point (23: far again) is outside; the last one inside
    assert chain.points == 20 * 200 + 4 and chain.connected == pytest.approx((chain.points - 2) / chain.points)
    # from the set of state 0 to that of state 1: the mean hitting time of the sampled 2-state chain, 1 / (its
    # observed 0 -> 1 jump frequency), about 1 / 0.05 lags
    jumps = sum(((t[:-1] == 0) & (t[1:] == 1)).sum() for t in states) / sum((t[:-1] == 0).sum() for t in states)
    assert chain.transition.mfpt == pytest.approx(1 / jumps, rel=0.05)
    # the two sets and the transition survive 3 k-means seeds x 2 state counts; the timescale, -1 / ln(0.9) = 9.5
    # lags, is a plateau across lags
    robust = chain.robustness
    assert len(robust.refits) == 5 and min(robust.agreement) > 0.99 and robust.transition == 1.0
    assert robust.metastable and robust.transition_survives
    assert robust.timescales[0] == pytest.approx(-1 / np.log(1 - 2 * jumps), rel=0.1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_downhill_relaxation_has_no_metastable_sets_and_no_transition_to_report(seed):
    from lightning_landscape.energy.chain import MSMConfig, chain_of, not_robust

    # 8 replicas relaxing from x = 10 towards 0 (x ~ 10 exp(-t / 10) plus noise), as SGD replicas at temperature 0
    # relax from the current point: the "sets" a chain finds are strata of the one descent
    rng = np.random.default_rng(seed)
    t = np.arange(41)
    replicas = [
        np.stack([10 * np.exp(-t / 10) + 0.3 * rng.standard_normal(41), 0.3 * rng.standard_normal(41)], 1)
        for _ in range(8)
    ]
    chain = chain_of(replicas, {"loss": [r[:, 0] ** 2 for r in replicas]}, [(0, 0)], [(0, 40)], MSMConfig(), seed)
    robust = chain.robustness
    assert len(chain.model.sets) >= 2 and not robust.transition_survives
    assert robust.transition < 1.0 or not robust.metastable
    assert "not reported" in not_robust(robust) or "did not survive" in not_robust(robust)
