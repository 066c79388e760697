"""Basin sampling, quenches and the minima database against exact answers."""

import numpy as np
import pytest
import torch
from torch import nn

from lightning_landscape import Objective
from lightning_landscape.dynamics import MinimaDatabase, SparseProjection, quench, sample_basin
from lightning_landscape.geometry.paths import minimum_energy_path
from tests.potentials import MIN_A, MIN_C, kinked_well, mueller_brown, point


def quadratic(A, targets):
    """L_b(x) = 0.5 x^T A x - t_b^T x for batches b = targets (rows)."""
    module = nn.Linear(A.shape[0], 1, bias=False).double()
    return Objective(
        module,
        [t for t in targets],
        lambda m, t: 0.5 * (m.weight[0] @ A @ m.weight[0]) - t @ m.weight[0],
        dtype=torch.float64,
    )


def test_sgd_replicas_follow_the_hand_computed_minibatch_steps():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(4, 4, generator=g, dtype=torch.float64)
    A = M @ M.T / 4 + torch.eye(4, dtype=torch.float64)
    targets = torch.randn(3, 4, generator=g, dtype=torch.float64)
    obj = quadratic(A, targets)
    x0 = torch.randn(4, generator=g, dtype=torch.float64)
    runs = sample_basin(obj, x0, replicas=3, steps=7, lr=0.1, seed=5, record_every=3)
    assert runs.steps.tolist() == [0, 3, 6, 7] and runs.n_grad == 21
    for row, r in enumerate(runs.replica_ids):
        # replay: the replica's generator picks the batch of every step, then x <- x - lr (A x - t_b)
        from lightning_landscape.dynamics.excursions import replica_seed

        gen = torch.Generator().manual_seed(replica_seed(5, int(r)))
        x, path, losses = x0.clone(), [], []
        for s in range(8):
            b = int(torch.randint(3, (1,), generator=gen))
            if s in (0, 3, 6, 7):
                path.append(x.clone())
                losses.append(float(0.5 * x @ A @ x - targets[b] @ x))
            x = x - 0.1 * (A @ x - targets[b]) if s < 7 else x
        np.testing.assert_allclose(runs.sketches[row], torch.stack(path).numpy(), rtol=1e-12)  # identity sketch
        np.testing.assert_allclose(runs.losses[row], losses, rtol=1e-12)
        torch.testing.assert_close(runs.finals[row], x, rtol=1e-12, atol=1e-12)
    # a replica is the same whichever subset of replicas a process runs (DDP ranks split them): to the bit under the
    # loop; under vmap (which "auto" may pick by timing) to rounding, as a BLAS kernel may change with the rows
    alone = sample_basin(obj, x0, replicas=[2], steps=7, lr=0.1, seed=5, record_every=3)
    np.testing.assert_allclose(alone.sketches[0], runs.sketches[2], rtol=1e-14, atol=1e-15)
    looped = quadratic(A, targets)
    looped.batching = "loop"
    together = sample_basin(looped, x0, replicas=3, steps=7, lr=0.1, seed=5, record_every=3)
    alone = sample_basin(looped, x0, replicas=[2], steps=7, lr=0.1, seed=5, record_every=3)
    np.testing.assert_array_equal(alone.sketches[0], together.sketches[2])


@pytest.mark.parametrize("seed", [0, 1])
def test_heavy_ball_replicas_equal_torch_sgd_with_momentum_on_the_same_minibatches(seed):
    """A replica with ``momentum`` takes the steps ``torch.optim.SGD(lr, momentum)`` takes on the minibatches its
    generator picks (from rest: the first step is a plain gradient step)."""
    from lightning_landscape.dynamics.excursions import replica_seed

    g = torch.Generator().manual_seed(seed)
    M = torch.randn(4, 4, generator=g, dtype=torch.float64)
    A = M @ M.T / 4 + torch.eye(4, dtype=torch.float64)
    targets = torch.randn(3, 4, generator=g, dtype=torch.float64)
    obj = quadratic(A, targets)
    x0 = torch.randn(4, generator=g, dtype=torch.float64)
    runs = sample_basin(obj, x0, replicas=3, steps=20, lr=0.05, seed=seed, record_every=5, momentum=0.9)
    assert runs.meta["momentum"] == 0.9
    for row, r in enumerate(runs.replica_ids):
        gen = torch.Generator().manual_seed(replica_seed(seed, int(r)))
        x = torch.nn.Parameter(x0.clone())
        optimizer = torch.optim.SGD([x], lr=0.05, momentum=0.9)
        path = []
        for s in range(21):
            b = int(torch.randint(3, (1,), generator=gen))
            if s % 5 == 0:
                path.append(x.detach().clone())
            if s < 20:
                optimizer.zero_grad()
                (0.5 * x @ A @ x - targets[b] @ x).backward()
                optimizer.step()
        np.testing.assert_allclose(runs.sketches[row], torch.stack(path).numpy(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(runs.finals[row], x.detach(), rtol=1e-12, atol=1e-12)
    plain = sample_basin(obj, x0, replicas=3, steps=20, lr=0.05, seed=seed, record_every=5)
    assert not np.allclose(plain.sketches[:, -1], runs.sketches[:, -1])  # momentum changed the path
    with pytest.raises(ValueError, match="`momentum` must be in"):
        sample_basin(obj, x0, replicas=1, steps=2, lr=0.05, momentum=1.0)


def replica_pool(seed: int = 0):
    """A small ReLU classifier and a pool of 6 minibatches (tuples of tensors, as a DataLoader gives them)."""
    from tests.helpers import blobs

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = blobs(96, seed=seed).tensors
    return net, [(x[i : i + 16], y[i : i + 16]) for i in range(0, 96, 16)]


def ce_loss(module, batch):
    return torch.nn.functional.cross_entropy(module(batch[0]), batch[1])


@pytest.mark.parametrize("temperature", [0.0, 0.05])
@pytest.mark.parametrize("seed", [0, 1])
def test_replicas_stepped_together_equal_each_replica_alone_and_the_one_by_one_loop(temperature, seed):
    net, pool = replica_pool(seed)
    batched = Objective(net, pool, ce_loss, batching="vmap")
    x0 = batched.theta0
    kwargs = dict(steps=30, lr=0.2, temperature=temperature, seed=seed, record_every=4)
    together = sample_basin(batched, x0, replicas=6, **kwargs)
    assert batched._minibatch_method == "vmap"  # one vmapped call per step for all replicas
    for r in (0, 3, 5):  # a replica is the same whichever replicas run beside it (DDP ranks split them)
        alone = sample_basin(Objective(net, pool, ce_loss, batching="vmap"), x0, replicas=[r], **kwargs)
        np.testing.assert_array_equal(alone.sketches[0], together.sketches[r])
        assert torch.equal(alone.finals[0], together.finals[r])
    looped = sample_basin(Objective(net, pool, ce_loss, batching="loop"), x0, replicas=6, **kwargs)
    np.testing.assert_allclose(together.sketches, looped.sketches, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(together.losses, looped.losses, rtol=1e-5, atol=1e-6)
    assert together.n_grad == looped.n_grad == 6 * 30


def test_replicas_fall_back_to_the_loop_when_the_loss_cannot_be_vmapped():
    net, pool = replica_pool()

    def stepwise(module, batch):  # .item() cannot run under vmap
        loss = ce_loss(module, batch)
        return loss * (1.0 if loss.item() > -1 else 0.0)

    objective = Objective(net, pool, stepwise)
    with pytest.warns(UserWarning, match="cannot vmap minibatch gradients"):
        runs = sample_basin(objective, objective.theta0, replicas=3, steps=5, lr=0.1)
    assert objective._minibatch_method == "loop"
    exact = sample_basin(Objective(net, pool, ce_loss, batching="loop"), objective.theta0, replicas=3, steps=5, lr=0.1)
    np.testing.assert_allclose(runs.sketches, exact.sketches, rtol=1e-6)


@pytest.mark.slow
def test_sgld_samples_the_boltzmann_distribution_of_a_harmonic_well():
    """L = 0.5 k x^2 with SGLD at temperature T: stationary density exp(-L/T), variance T/k (to O(lr k))."""
    k, T, lr = 2.0, 0.05, 0.01
    obj = Objective(
        nn.Linear(1, 1, bias=False).double(), [torch.zeros(1)], lambda m, _: 0.5 * k * m.weight[0, 0] ** 2,
        dtype=torch.float64,
    )  # fmt: skip
    runs = sample_basin(obj, torch.zeros(1, dtype=torch.float64), 8, 4000, lr, T, seed=1, record_every=5)
    samples = runs.sketches[:, 100:, 0].ravel()  # after 500 steps (5 relaxation times 1/(lr k))
    exact = T / k / (1 - lr * k / 2)  # the discretized Ornstein-Uhlenbeck process's variance
    n_eff = samples.size / (2 / (lr * k * 5))  # samples per integrated autocorrelation time
    assert samples.var() == pytest.approx(exact, rel=4 * np.sqrt(2 / n_eff))
    assert abs(samples.mean()) < 4 * np.sqrt(exact / n_eff)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_sgld_with_momentum_samples_the_same_boltzmann_distribution(seed):
    """Heavy-ball SGLD (momentum 0.9, the noise entering with the gradient) on L = 0.5 k x^2: variance T/k, as plain
    SGLD (the recursion's exact stationary variance is 1.0005 T/k here; the same noise added to x instead would
    give 1.19 T/k, outside the tolerance)."""
    k, T, lr, beta = 2.0, 0.05, 0.001, 0.9  # effective rate lr / (1 - beta) = 0.01, as the plain test
    obj = Objective(
        nn.Linear(1, 1, bias=False).double(), [torch.zeros(1)], lambda m, _: 0.5 * k * m.weight[0, 0] ** 2,
        dtype=torch.float64,
    )  # fmt: skip
    runs = sample_basin(obj, torch.zeros(1, dtype=torch.float64), 16, 4000, lr, T, seed=seed, record_every=5,
                        momentum=beta)  # fmt: skip
    samples = runs.sketches[:, 100:, 0].ravel()  # after 500 steps (5 relaxation times (1 - beta) / (lr k))
    n_eff = samples.size / (2 * (1 - beta) / (lr * k * 5))
    assert samples.var() == pytest.approx(T / k, rel=4 * np.sqrt(2 / n_eff) + 0.02)  # + O(lr k / (1 - beta))


def test_sketched_replicas_preserve_distances():
    obj = Objective(nn.Linear(300, 1), [(torch.randn(8, 300), torch.zeros(8, 1))], lambda m, b: (m(b[0]) ** 2).mean())
    sketch = SparseProjection(301, 256, seed=0, nnz=4)
    runs = sample_basin(obj, obj.theta0, 2, 5, lr=0.5, temperature=0.01, sketch=sketch, seed=0)
    assert runs.sketches.shape == (2, 6, 256)
    true = float((runs.finals[0] - runs.finals[1]).norm())
    sketched = float(np.linalg.norm(runs.sketches[0, -1] - runs.sketches[1, -1]))
    assert sketched == pytest.approx(true, rel=0.35)


def test_bad_basin_settings_are_rejected():
    obj = quadratic(torch.eye(2, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="`temperature`"):
        sample_basin(obj, torch.zeros(2), temperature=-1.0)
    with pytest.raises(ValueError, match="`lr`"):
        sample_basin(obj, torch.zeros(2), lr=0.0)


@pytest.mark.parametrize("method", ["lbfgs", "gd"])
def test_quench_reaches_the_exact_minimum(method):
    g = torch.Generator().manual_seed(1)
    M = torch.randn(5, 5, generator=g, dtype=torch.float64)
    A = M @ M.T / 5 + torch.eye(5, dtype=torch.float64)
    t = torch.randn(1, 5, generator=g, dtype=torch.float64)
    obj = quadratic(A, t)
    q = quench(obj, torch.zeros(5, dtype=torch.float64), method=method, max_iter=2000, rtol=1e-9, lr=0.2)
    torch.testing.assert_close(q.theta, torch.linalg.solve(A, t[0]), rtol=1e-6, atol=1e-7)
    assert q.converged and q.grad_norm < 1e-7 and q.grad_ratio <= 1e-9


@pytest.mark.parametrize("start", [(0.7, 0.5), (1.4, -0.2), (-0.3, 0.1)])
def test_quench_converges_to_the_energy_resolution_on_a_kinked_minimum(start):
    well = Objective(nn.Linear(2, 1, bias=False).double(), [torch.zeros(1)], kinked_well, dtype=torch.float64)
    theta = torch.tensor(start, dtype=torch.float64)
    plain = quench(well, theta, max_iter=300)
    assert not plain.converged and plain.criterion == ""  # the gradient criterion cannot hold on the kink
    q = quench(well, theta, max_iter=300, ftol=1e-6)
    assert q.converged and q.criterion == "energy" and q.last_drop <= 1e-6
    assert q.loss < 1e-5 and abs(abs(float(q.theta[0])) - 1) < 1e-3  # the exact minimum, loss 0 at x = +-1
    assert q.grad_ratio > 1e-3  # while the gradient stayed large


def test_quench_does_not_call_a_descent_that_keeps_falling_converged():
    # exp(-x): no minimum at finite x, the loss keeps falling, as cross-entropy does on data a network can fit
    runaway = Objective(
        nn.Linear(1, 1, bias=False).double(),
        [torch.zeros(1)],
        lambda m, _: torch.exp(-m.weight[0, 0]),
        dtype=torch.float64,
    )
    q = quench(runaway, torch.zeros(1, dtype=torch.float64), method="gd", lr=0.1, max_iter=100, ftol=1e-4)
    assert not q.converged and q.last_drop > 1e-4


def test_quench_maps_a_mueller_brown_basin_to_its_minimum():
    potential = Objective(nn.Linear(2, 1, bias=False).double(), [torch.zeros(1)], mueller_brown, dtype=torch.float64)
    q = quench(potential, point(MIN_C) + torch.tensor([0.05, -0.03], dtype=torch.float64), rtol=1e-8)
    assert q.loss == pytest.approx(MIN_C[2], abs=0.01)
    torch.testing.assert_close(q.theta, point(MIN_C), atol=2e-3, rtol=0)
    q = quench(potential, point(MIN_A) + torch.tensor([0.1, 0.1], dtype=torch.float64), rtol=1e-8)
    assert q.loss == pytest.approx(MIN_A[2], abs=0.01)


def test_minima_database_dedups_in_function_space_persists_and_plans_the_spanning_tree(tmp_path):
    db = MinimaDatabase(tmp_path / "db", tol=0.05)
    assert db.add(np.zeros(2), 1.0, np.array([10.0, 0.0]), step=1) == (0, True)
    assert db.add(np.zeros(2), 2.0, np.array([0.0, 10.0]), step=1) == (1, True)
    assert db.add(np.zeros(2), 3.0, np.array([10.0, 10.0]), step=1) == (2, True)
    assert db.add(np.ones(2), 0.5, np.array([10.1, 0.0]), step=2) == (0, False)  # same function, lower loss
    assert db.records[0]["loss"] == 0.5 and db.records[0]["visits"] == 2 and db.theta(0).tolist() == [1.0, 1.0]
    assert db.add(np.ones(2), 9.0, np.array([0.0, 10.1]), step=2) == (1, False)  # same function, higher loss
    assert db.records[1]["loss"] == 2.0
    # spanning tree on function distances: 0-2 and 1-2 (distance ~0.83) beat 0-1 (distance 1.41)
    assert sorted(db.missing_tree_edges()) == [(0, 2), (1, 2)]
    db.set_saddle(2, 0, 4.0)
    db.set_saddle(0, 2, 5.0)  # a higher path does not replace a lower one
    assert db.missing_tree_edges() == [(1, 2)]
    reopened = MinimaDatabase(tmp_path / "db")
    assert reopened.losses.tolist() == [0.5, 2.0, 3.0]
    assert reopened.saddle_matrix()[0, 2] == 4.0 and np.isinf(reopened.saddle_matrix()[0, 1])
    assert reopened.nearest(np.array([0.0, 9.9]))[0] == 1


def test_an_unconverged_path_does_not_climb():
    potential = Objective(nn.Linear(2, 1, bias=False).double(), [torch.zeros(1)], mueller_brown, dtype=torch.float64)
    path = minimum_energy_path(potential, point(MIN_A), point(MIN_C), n_images=9, step_size=1e-4, n_steps=5)
    assert not path.converged
    assert path.saddle_loss == pytest.approx(float(path.losses[1:-1].max()))
    torch.testing.assert_close(path.saddle, path.images[path.saddle_index])


def test_rollback_forgets_minima_visits_and_saddles_found_after_the_step(tmp_path):
    db = MinimaDatabase(tmp_path / "db", tol=0.01)
    outputs = [np.full(4, float(i)) + 1 for i in range(4)]
    for step, i in ((6, 0), (6, 1), (12, 0), (12, 2), (18, 1), (18, 3)):
        db.add(np.zeros(3), 1.0 + i, outputs[i], step=step)
    db.set_saddle(0, 1, 5.0, step=12)
    db.set_saddle(0, 2, 6.0, step=18)
    db.rollback(12)
    reloaded = MinimaDatabase(tmp_path / "db")
    assert [r["id"] for r in reloaded.records] == [0, 1, 2]
    assert [r["visits"] for r in reloaded.records] == [2, 1, 1]  # minimum 1's visit at step 18 is gone
    assert list(reloaded.saddles) == [(0, 1)]
    assert not (tmp_path / "db" / "theta" / "00003.npy").exists()
