"""Certified minima: every stored minimum has its smallest Hessian eigenvalue and a bound on its energy error; a
saddle is kicked off and both sides quenched. Checked against exact answers and against pele, an independent
energy-landscape library (its L-BFGS minimizer and its transition-state search)."""

import numpy as np
import pytest
import torch
from scipy.optimize import minimize, root
from torch import nn

from lightning_landscape import Objective
from lightning_landscape.dynamics import MinimaDatabase
from lightning_landscape.dynamics.minima import certify
from lightning_landscape.energy import QuenchConfig, add_minimum, basins_of, quench_point
from tests.potentials import MIN_A, MIN_B, MIN_C, SADDLE_1, SADDLE_2, mueller_brown


def ridge_well(module, _batch):
    """``(x^2 - 1)^2 / 2 + 2 y^2``: minima (+-1, 0) at 0, the saddle (0, 0) at 1/2 with eigenvalues -2 and 4."""
    x, y = module.weight[0, 0], module.weight[0, 1]
    return 0.5 * (x**2 - 1) ** 2 + 2 * y**2


def two_d(loss_fn, dtype=torch.float64):
    return Objective(
        nn.Linear(2, 1, bias=False).to(dtype),
        [torch.zeros(1)],
        loss_fn,
        dtype=dtype,
        outputs_fn=lambda m, _: m.weight.reshape(1, 2),
    )


@pytest.mark.parametrize("merge_barrier", [0.0, 0.1])
def test_a_quench_from_the_ridge_stops_at_the_saddle_which_is_kicked_into_both_wells(tmp_path, merge_barrier):
    well = two_d(ridge_well)
    point_ = quench_point(well, torch.tensor([0.0, 0.7], dtype=torch.float64), QuenchConfig(), merge_barrier)
    assert point_.certificate.kind == "saddle" and point_.certificate.lambda_min == pytest.approx(-2.0, rel=1e-6)
    np.testing.assert_allclose(point_.theta, [0.0, 0.0], atol=1e-6)
    assert [k.certificate.kind for k in point_.kicked] == ["minimum", "minimum"]
    assert sorted(np.sign(k.theta[0]) for k in point_.kicked) == [-1.0, 1.0]
    for k in point_.kicked:  # the true minimum is at 0: the loss is the energy error, within the stated one
        assert 0 <= k.loss <= 1.01 * k.certificate.energy_error  # the model is quadratic: exact to third order
        assert k.certificate.resolution == pytest.approx(max(merge_barrier / 10, 8 * 2.0**-52))  # the loss rounding
    db = MinimaDatabase(tmp_path / "db")
    current, new = add_minimum(db, point_, step=0)
    assert len(db) == 2 and new == 2 and current in (0, 1)
    assert db.saddles[(0, 1)]["saddle"] == pytest.approx(0.5, abs=1e-9) and db.saddles[(0, 1)]["method"] == "saddle"
    assert all(r["certified"] and r["lambda_min"] == pytest.approx(4.0, rel=1e-3) for r in db.records)
    assert basins_of(db, merge_barrier).n_basins == 2  # the barrier 0.5 separates them at either level
    assert basins_of(db, 0.6).n_basins == 1


def test_a_minimum_is_certified_a_saddle_is_not_and_a_slope_is_not():
    well = two_d(ridge_well)
    minimum = certify(well, torch.tensor([1.0, 0.0], dtype=torch.float64), 1e-9)
    assert minimum.kind == "minimum" and minimum.energy_error == 0.0 and minimum.n_hvp <= 4
    assert minimum.lambda_min == pytest.approx(4.0) and minimum.lambda_max == pytest.approx(4.0)
    # 1e-2 above the minimum along y: the quadratic model's remaining descent is exact, 2 y^2 = 2e-4
    slope = certify(well, torch.tensor([1.0, 1e-2], dtype=torch.float64), 1e-9)
    assert slope.kind == "uncertified" and slope.energy_error == pytest.approx(2e-4, rel=1e-9)


def test_uncertified_minima_are_never_merged_and_unresolved_barriers_always_are(tmp_path):
    db = MinimaDatabase(tmp_path / "db")
    for k, (loss, certified, error) in enumerate([(0.0, True, 1e-3), (0.01, True, 1e-3), (0.02, False, 0.5)]):
        db.add(np.full(2, float(k)), loss, np.array([float(k), 0.0]), certified=certified, energy_error=error)
    db.set_saddle(0, 1, 0.011)  # barrier 1e-3 out of 1, below the ends' errors (2e-3): not resolved
    db.set_saddle(1, 2, 0.021)  # barrier 1e-3 out of 2, an uncertified end
    assert db.basins(merge_barrier=0.0).tolist() == [0, 0, 1]
    assert db.basins(merge_barrier=1.0).tolist() == [0, 0, 1]


@pytest.fixture(scope="module")
def pele_mueller_brown():
    """pele's minima and transition states of the Mueller-Brown potential (its own L-BFGS and its hybrid
    eigenvector-following search), from starts near the known points."""
    pele_ts = pytest.importorskip("pele.transition_states")
    from pele.optimize import lbfgs_py
    from pele.potentials import BasePotential

    objective = two_d(mueller_brown)

    class MuellerBrown(BasePotential):
        def getEnergy(self, coords):
            return float(objective.loss(torch.from_numpy(np.asarray(coords, dtype=np.float64))))

        def getEnergyGradient(self, coords):
            loss, g = objective.loss_and_grad(torch.from_numpy(np.asarray(coords, dtype=np.float64)))
            return float(loss), g.numpy()

    pot = MuellerBrown()
    minima = [lbfgs_py(np.array(m[:2]) + 0.05, pot, tol=1e-10).coords for m in (MIN_A, MIN_B, MIN_C)]
    saddles = []
    for s in (SADDLE_1, SADDLE_2):
        found = pele_ts.findTransitionState(np.array(s[:2]) + 0.02, pot, orthogZeroEigs=None, tol=1e-8)
        assert found.success and found.eigenval < 0
        # polished to a stationary point by Newton's method on the gradient (pele stops at |g| ~ 0.2)
        polished = root(lambda xy: pot.getEnergyGradient(xy)[1], found.coords, tol=1e-14).x
        assert np.linalg.norm(polished - found.coords) < 1e-3
        saddles.append((polished, pot.getEnergy(polished)))
    return objective, pot, minima, saddles


def test_quenches_from_the_mueller_brown_saddles_end_in_the_adjacent_minima_as_pele_finds(tmp_path, pele_mueller_brown):
    objective, pot, minima, saddles = pele_mueller_brown
    db = MinimaDatabase(tmp_path / "db")
    for (coords, energy), adjacent in zip(saddles, [(0, 2), (1, 2)], strict=True):  # A-C and C-B
        found = quench_point(objective, torch.from_numpy(coords), QuenchConfig(), level=1.0)
        assert found.certificate.kind == "saddle" and found.loss == pytest.approx(energy, abs=1e-6)
        ends = sorted((k.theta for k in found.kicked), key=lambda t: float(pot.getEnergy(t)))
        wanted = sorted((minima[i] for i in adjacent), key=lambda t: float(pot.getEnergy(t)))
        for end, want in zip(ends, wanted, strict=True):
            np.testing.assert_allclose(end, want, atol=1e-4)
        assert all(k.certified for k in found.kicked)
        add_minimum(db, found, step=0)
    # the tree: A, B and C stored once each, joined through pele's two saddles; merged at pele's saddle energies
    assert len(db) == 3
    np.testing.assert_allclose(sorted(db.losses), sorted(pot.getEnergy(m) for m in minima), atol=1e-6)
    levels = sorted(s["saddle"] for s in db.saddles.values())
    np.testing.assert_allclose(levels, sorted(e for _, e in saddles), atol=1e-6)
    labels = db.basins(merge_barrier=30.0)  # C escapes to B over 8.5, A to C over 106: two basins
    by_loss = np.argsort(db.losses)  # A, B, C
    assert labels[by_loss[1]] == labels[by_loss[2]] != labels[by_loss[0]]


@pytest.mark.slow
def test_a_float32_networks_minimum_is_located_to_its_stated_bound():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    x = torch.randn(128, 4)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    batches = [(x[:64], y[:64]), (x[64:], y[64:])]
    ce = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    objective = Objective(net, batches, ce, l2=1e-2)  # float32, with weight decay: a minimum at finite weights
    found = quench_point(objective, objective.theta0, QuenchConfig(ftol=1e-6))
    assert found.certified and found.certificate.energy_error <= 1e-6 and found.certificate.lambda_min > -1e-3
    # the reference: scipy's L-BFGS in float64 from the stored point, run far past any stopping rule of ours
    exact = objective.in_dtype(torch.float64)

    def f(theta):
        loss, g = exact.loss_and_grad(torch.from_numpy(theta))
        return float(loss), g.numpy()

    ref = minimize(f, found.theta, jac=True, method="L-BFGS-B", options={"maxiter": 3000, "gtol": 1e-12, "ftol": 0})
    assert found.loss - ref.fun <= found.certificate.energy_error + 1e-12
    assert found.loss - ref.fun >= 0
