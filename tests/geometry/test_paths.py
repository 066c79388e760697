"""Minimum-energy paths on the Mueller-Brown potential, whose minima and saddles are known."""

import numpy as np
import pytest
import torch
from torch import nn

from lightning_landscape import Objective
from lightning_landscape.geometry import interpolate
from lightning_landscape.geometry.paths import minimum_energy_path
from tests.potentials import MIN_A, MIN_B, MIN_C, SADDLE_1, kinked_well, mueller_brown, point


@pytest.fixture(scope="module")
def potential():
    return Objective(nn.Linear(2, 1, bias=False).double(), [torch.zeros(1)], mueller_brown, dtype=torch.float64)


def quench(obj, theta, steps=3000, lr=1e-4):
    for _ in range(steps):
        theta = theta - lr * obj.grad(theta)
    return theta


@pytest.mark.slow
@pytest.mark.parametrize("method", ["string", "neb"])
def test_path_with_default_settings_finds_the_known_saddle_barriers_and_intermediate_minimum(potential, method):
    a, b = quench(potential, point(MIN_A)), quench(potential, point(MIN_B))  # exact minima
    assert float(potential.loss(a)) == pytest.approx(MIN_A[2], abs=0.01)
    path = minimum_energy_path(potential, a, b, n_images=31, method=method)  # curvature ~1e3: no step to tune
    assert path.converged and path.force_ratio <= 1e-3 and np.isfinite(path.losses).all()
    # the highest point is the first saddle, refined by the climbing image
    assert path.saddle_loss == pytest.approx(SADDLE_1[2], rel=0.01)
    torch.testing.assert_close(path.saddle, point(SADDLE_1), atol=0.01, rtol=0)
    assert path.barrier_forward == pytest.approx(SADDLE_1[2] - MIN_A[2], rel=0.01)
    assert path.barrier_backward == pytest.approx(SADDLE_1[2] - MIN_B[2], rel=0.01)
    # the intermediate minimum on the way
    assert len(path.intermediate_minima) == 1
    theta_c, loss_c = path.intermediate_minima[0]
    assert loss_c == pytest.approx(MIN_C[2], rel=0.01)
    torch.testing.assert_close(theta_c, point(MIN_C), atol=0.01, rtol=0)
    assert path.arc[0] == 0 and path.arc[-1] == pytest.approx(1.0) and path.length > float((b - a).norm())
    # linear interpolation overstates the barrier
    assert interpolate(potential, a, b, steps=101).barrier > 1.5 * path.barrier_backward  # 120.8 vs 67.5


def test_bad_settings_are_rejected(potential):
    with pytest.raises(ValueError, match="`n_images`"):
        minimum_energy_path(potential, point(MIN_A), point(MIN_B), n_images=2)
    with pytest.raises(ValueError, match="`method`"):
        minimum_energy_path(potential, point(MIN_A), point(MIN_B), method="nudged")


@pytest.mark.slow
def test_a_step_that_overflows_is_halved_instead_of_returning_nan(potential):
    a, b = quench(potential, point(MIN_A)), quench(potential, point(MIN_B))
    path = minimum_energy_path(potential, a, b, n_images=15, step_size=10.0)  # 1000x too large: the loss overflows
    assert np.isfinite(path.losses).all() and path.losses.max() < 0  # never NaN, never thrown out of the wells


def test_ends_without_a_finite_gradient_are_refused(potential):
    with pytest.raises(FloatingPointError, match="not finite"):
        minimum_energy_path(potential, point(MIN_A), torch.tensor([1e3, 1e3], dtype=torch.float64))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["string", "neb"])
def test_path_on_a_kinked_valley_converges_to_the_energy_resolution_and_finds_the_exact_saddle(method):
    well = Objective(nn.Linear(2, 1, bias=False).double(), [torch.zeros(1)], kinked_well, dtype=torch.float64)
    a, b = torch.tensor([-1.0, 0.0], dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64)
    plain = minimum_energy_path(well, a, b, 15, method, n_steps=300)
    assert not plain.converged and plain.criterion == ""  # the force jumps across the kink: it never vanishes
    path = minimum_energy_path(well, a, b, 15, method, ftol=1e-4)
    assert path.converged and path.criterion == "energy" and path.force_ratio > 0.1
    assert path.saddle_loss == pytest.approx(1.0, abs=1e-3)  # the saddle (0, 0.3) at loss 1
    torch.testing.assert_close(path.saddle, torch.tensor([0.0, 0.3], dtype=torch.float64), atol=2e-3, rtol=0)
