"""Curvature estimators against exact answers: dense Hessians, quadratics, curvlinops, ReLU rescaling."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_landscape import Objective, ParameterLayout
from lightning_landscape.curvature import (
    adaptive_sharpness,
    edge_of_stability_ratio,
    epsilon_sharpness,
    gradient_moments,
    gradient_noise,
    hessian_eigenvalues,
    hessian_trace,
    pac_bayes_sigma,
    parameter_indices,
    sam_sharpness,
    spectral_density,
)
from lightning_landscape.curvature.lanczos import lanczos_tridiagonal
from tests.helpers import blobs


def ce(module, batch):
    return F.cross_entropy(module(batch[0]), batch[1])


@pytest.fixture(scope="module")
def mlp_problem():
    """A 3-8-8-3 tanh MLP (131 parameters) in float64 with its dense Hessian."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = blobs(64).tensors
    batches = [(x[:40].double(), y[:40]), (x[40:].double(), y[40:])]
    obj = Objective(net, batches, ce, dtype=torch.float64)
    layout = ParameterLayout.from_module(net)

    def f(theta):
        out = torch.func.functional_call(net, layout.unflatten(theta), (x.double(),))
        return F.cross_entropy(out, y)

    hessian = torch.autograd.functional.hessian(f, obj.theta0)
    return obj, hessian, torch.linalg.eigvalsh(hessian)


def quadratic(eigs, dtype=torch.float64):
    """L(w) = 1/2 w^T A w with A = diag(eigs), as a bias-free linear module."""
    A = torch.diag(torch.as_tensor(eigs, dtype=dtype))
    module = nn.Linear(len(eigs), 1, bias=False).to(dtype)
    return Objective(module, [A], lambda m, A: 0.5 * (m.weight[0] @ A @ m.weight[0]), dtype=dtype), A


@pytest.mark.parametrize("method", ["arpack", "lanczos"])
def test_extreme_eigenvalues_match_the_dense_hessian(mlp_problem, method):
    obj, _, exact = mlp_problem
    top = hessian_eigenvalues(obj, k=5, tol=1e-10, method=method)
    bottom = hessian_eigenvalues(obj, k=3, which="smallest", tol=1e-10, method=method)
    torch.testing.assert_close(top.eigenvalues, exact.flip(0)[:5], rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(bottom.eigenvalues, exact[:3], rtol=1e-4, atol=1e-8)
    assert top.n_hvp > 0 and top.converged


def test_eigenvectors_are_eigenvectors(mlp_problem):
    obj, hessian, _ = mlp_problem
    res = hessian_eigenvalues(obj, k=2, tol=1e-10, return_eigenvectors=True)
    for lam, v in zip(res.eigenvalues, res.eigenvectors.T, strict=True):
        torch.testing.assert_close(hessian @ v, lam * v, rtol=1e-5, atol=1e-6)


def test_power_iteration_finds_the_largest_magnitude(mlp_problem):
    obj, _, exact = mlp_problem
    res = hessian_eigenvalues(obj, k=1, tol=1e-8, method="power", max_iter=5000)
    assert math.isclose(float(res.eigenvalues[0]), float(exact.abs().max()), rel_tol=1e-3)


def test_trace_estimates_are_within_three_standard_errors(mlp_problem):
    obj, hessian, _ = mlp_problem
    exact = float(torch.trace(hessian))
    for method in ("hutchinson", "hutch++"):
        res = hessian_trace(obj, n_samples=60, method=method, seed=1)
        assert abs(res.estimate - exact) < 3 * res.std_error, (method, res, exact)
        assert res.n_hvp == 60


def test_lanczos_quadrature_is_exact_for_low_degree_moments(mlp_problem):
    _, hessian, _ = mlp_problem
    q = torch.randn(hessian.shape[0], dtype=torch.float64)
    q = q / q.norm()
    m = 6
    alpha, beta, _ = lanczos_tridiagonal(lambda v: hessian @ v, q, m)
    T = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    for k in range(2 * m):
        exact = q @ torch.linalg.matrix_power(hessian, k) @ q
        torch.testing.assert_close(torch.linalg.matrix_power(T, k)[0, 0], exact, rtol=1e-6, atol=1e-10)


def test_slq_moments_match_the_exact_spectrum(mlp_problem):
    obj, _, exact = mlp_problem
    density = spectral_density(obj, n_vectors=40, n_steps=20, seed=3)
    for k in (1, 2):
        per_vector = np.sum(density.weights * density.nodes**k, axis=1)
        error = per_vector.std(ddof=1) / math.sqrt(len(per_vector))
        assert abs(density.moment(k) - float((exact**k).mean())) < 3 * error + 1e-9
    assert abs(np.trapezoid(density.density, density.grid) - 1) < 1e-3  # a probability density


def test_per_layer_eigenvalues_and_trace_are_those_of_the_diagonal_block(mlp_problem):
    obj, hessian, _ = mlp_problem
    idx = parameter_indices(obj.layout, ["2.*"])
    block = hessian[idx][:, idx]
    res = hessian_eigenvalues(obj, k=2, tol=1e-10, params=["2.*"])
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(block).flip(0)[:2], rtol=1e-4, atol=1e-8)
    tr = hessian_trace(obj, n_samples=3 * 72, params=["2.weight", "2.bias"])  # rank 72 <= m/3: exact
    assert math.isclose(tr.estimate, float(torch.trace(block)), rel_tol=1e-6)
    with pytest.raises(ValueError, match=r"matches no parameter.*HINT"):
        hessian_trace(obj, params=["nothing.*"])


def test_every_estimator_recovers_a_known_quadratic_spectrum():
    eigs = [5.0, 3.0, 2.0, 1.0, 0.5, -0.5]
    obj, A = quadratic(eigs)
    assert hessian_eigenvalues(obj, k=2, tol=1e-10).eigenvalues.tolist() == pytest.approx([5.0, 3.0])
    assert hessian_eigenvalues(obj, k=1, which="smallest", tol=1e-10).eigenvalues.tolist() == pytest.approx([-0.5])
    assert hessian_trace(obj, n_samples=4, method="hutchinson").estimate == pytest.approx(sum(eigs))  # diagonal
    assert hessian_trace(obj, n_samples=18).estimate == pytest.approx(sum(eigs))
    density = spectral_density(obj, n_vectors=3, n_steps=6)
    for row_nodes, row_weights in zip(density.nodes, density.weights, strict=True):
        assert sorted(row_nodes[row_weights > 1e-12]) == pytest.approx(sorted(eigs))
    # sharpness at a point w with the closed forms of the quadratic
    w = torch.tensor([0.3, -0.2, 0.1, 0.4, -0.5, 0.2], dtype=torch.float64)
    g = A @ w
    sam = sam_sharpness(obj, rho=0.1, theta=w)
    d = 0.1 * g / g.norm()
    assert sam.value == pytest.approx(float(g @ d + 0.5 * d @ A @ d))
    average = adaptive_sharpness(obj, rho=0.1, kind="average", n_samples=4000, theta=w)
    expected = 0.5 * 0.1**2 * float((torch.tensor(eigs, dtype=torch.float64) * w**2).sum())
    assert abs(average.value - expected) < 3 * average.extra["std_error"]
    sigma = pac_bayes_sigma(obj, threshold=0.05, n_samples=2000, theta=w).value
    assert sigma == pytest.approx(math.sqrt(2 * 0.05 / sum(eigs)), rel=0.05)  # 1/2 sigma^2 tr(A) = threshold


def test_epsilon_sharpness_reaches_a_corner_of_the_box():
    obj, _ = quadratic([2.0, 4.0, 1.0])
    res = epsilon_sharpness(obj, epsilon=0.1, theta=torch.zeros(3, dtype=torch.float64))
    assert res.perturbed_loss == pytest.approx(0.5 * (2 + 4 + 1) * 0.01)
    assert res.value == pytest.approx(100 * res.perturbed_loss)


def test_worst_case_adaptive_sharpness_on_a_quadratic():
    eigs = torch.tensor([4.0, 1.0], dtype=torch.float64)
    obj, _ = quadratic(eigs.tolist())
    w = torch.tensor([1.0, 1.0], dtype=torch.float64)  # |w| = 1: the scaled ball is the plain ball
    res = adaptive_sharpness(obj, rho=0.1, kind="worst", n_steps=50, theta=w)
    # max over |delta| <= 0.1 of g.delta + 1/2 delta^T A delta, found by a fine search on the circle
    angles = torch.linspace(0, 2 * math.pi, 20001, dtype=torch.float64)
    deltas = 0.1 * torch.stack([angles.cos(), angles.sin()], 1)
    best = ((deltas * (eigs * w)).sum(1) + 0.5 * (deltas**2 * eigs).sum(1)).max()
    assert res.value == pytest.approx(float(best), rel=1e-3)


def _relu_net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 3)).double()


def _rescaled(net, alpha):
    other = _relu_net()
    other.load_state_dict(net.state_dict())
    with torch.no_grad():
        other[0].weight.mul_(alpha), other[0].bias.mul_(alpha), other[2].weight.div_(alpha)
    return other


def test_adaptive_sharpness_is_invariant_to_relu_rescaling_and_the_others_are_not():
    x, y = blobs(64).tensors
    net = _relu_net()
    scaled = _rescaled(net, 4.0)
    a = Objective(net, [(x.double(), y)], ce, dtype=torch.float64)
    b = Objective(scaled, [(x.double(), y)], ce, dtype=torch.float64)
    assert float(a.loss()) == pytest.approx(float(b.loss()), rel=1e-12)  # the same function
    for kind in ("average", "worst"):
        sa = adaptive_sharpness(a, rho=0.05, kind=kind, n_samples=16)
        sb = adaptive_sharpness(b, rho=0.05, kind=kind, n_samples=16)
        assert sa.value == pytest.approx(sb.value, rel=1e-6), kind
    assert sam_sharpness(a).value != pytest.approx(sam_sharpness(b).value, rel=0.05)
    assert epsilon_sharpness(a, 1e-2).value != pytest.approx(epsilon_sharpness(b, 1e-2).value, rel=0.05)
    la = float(hessian_eigenvalues(a).eigenvalues[0])
    lb = float(hessian_eigenvalues(b).eigenvalues[0])
    assert la != pytest.approx(lb, rel=0.05)  # lambda_max is not rescaling-invariant (Dinh et al. 2017)


def test_gradient_noise_matches_hand_computed_per_sample_gradients():
    torch.manual_seed(0)
    x = torch.randn(30, 4, dtype=torch.float64)
    y = torch.randn(30, dtype=torch.float64)
    net = nn.Linear(4, 1, bias=False).double()
    obj = Objective(
        net,
        [(x[:20], y[:20]), (x[20:], y[20:])],
        lambda m, b: 0.5 * (m(b[0])[:, 0] - b[1]).pow(2).mean(),
        dtype=torch.float64,
    )
    w = net.weight[0].detach()
    per_sample = ((x @ w - y)[:, None] * x).numpy()  # g_i = (w.x_i - y_i) x_i
    mean = per_sample.mean(0)
    trace_cov = ((per_sample - mean) ** 2).sum(1).sum() / 29
    noise = gradient_noise(gradient_moments(obj), lr=0.1, batch_size=8)
    assert noise.n_samples == 30
    assert noise.trace_cov == pytest.approx(trace_cov, rel=1e-10)
    assert noise.grad_norm_sq == pytest.approx(float((mean**2).sum()), rel=1e-10)
    assert noise.b_simple == pytest.approx(trace_cov / float((mean**2).sum()), rel=1e-10)
    assert noise.temperature == pytest.approx(0.1 * trace_cov / (2 * 8 * 4), rel=1e-10)


def measured_stability_limit(lr: float, **sgd) -> float:
    """The curvature at which torch.optim.SGD starts to diverge on lambda x^2 / 2, by bisection on lambda."""

    def diverges(lam: float) -> bool:
        x = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
        optimizer = torch.optim.SGD([x], lr=lr, **sgd)
        for _ in range(1000):
            x.grad = lam * x.detach()  # the gradient of lam x^2 / 2
            optimizer.step()
        return not bool(torch.isfinite(x).all()) or bool(x.abs() > 1.0)

    low, high = 0.0, 1000.0
    for _ in range(30):
        mid = (low + high) / 2
        low, high = (low, mid) if diverges(mid) else (mid, high)
    return (low + high) / 2


@pytest.mark.slow
@pytest.mark.parametrize(
    "sgd", [{}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True}, {"momentum": 0.9, "dampening": 0.5}]
)
def test_edge_of_stability_ratio_is_one_at_the_limit_measured_by_running_sgd(sgd):
    measured = measured_stability_limit(0.1, **sgd)
    assert edge_of_stability_ratio(measured, 0.1, **sgd) == pytest.approx(1.0, rel=1e-3)


@pytest.mark.slow
def test_cnn_with_batchnorm_agrees_with_curvlinops():
    curvlinops = pytest.importorskip("curvlinops")
    from lightning_landscape.examples import SmallCNN

    torch.manual_seed(0)
    net = SmallCNN(in_channels=1, num_classes=4, channels=(3, 4)).double()
    with torch.no_grad():  # non-trivial running statistics
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)
    net.eval()
    x = torch.randn(24, 1, 12, 12, dtype=torch.float64)
    y = torch.randint(0, 4, (24,))
    data = [(x[:16], y[:16]), (x[16:], y[16:])]
    obj = Objective(net, data, ce, dtype=torch.float64)
    params = [p for p in net.parameters() if p.requires_grad]
    H = curvlinops.HessianLinearOperator(net, nn.CrossEntropyLoss(), params, data)
    dense = H @ torch.eye(H.shape[0], dtype=torch.float64)
    exact = torch.linalg.eigvalsh(0.5 * (dense + dense.T))
    ours = hessian_eigenvalues(obj, k=3, tol=1e-10)
    torch.testing.assert_close(ours.eigenvalues, exact.flip(0)[:3], rtol=1e-6, atol=1e-9)
    trace = hessian_trace(obj, n_samples=3 * H.shape[0])  # sketch of full rank: exact
    assert trace.estimate == pytest.approx(float(torch.trace(dense)), rel=1e-6)


def trained_net_quadratic(dim: int = 300):
    """A dense quadratic with the spectrum of a trained classifier's Hessian: a few outliers (the top two 0.4855 and
    0.4385, as measured on a digits MLP), a bulk near 0, and small negative eigenvalues."""
    g = torch.Generator().manual_seed(5)
    outliers = torch.tensor([0.4855, 0.4385, 0.40, 0.37, 0.33, 0.30, 0.26, 0.22, 0.18, -0.04, -0.035, -0.03])
    bulk = torch.randn(dim - 12, generator=g, dtype=torch.float64).abs() * 0.02 - 0.01
    Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(torch.cat([outliers.double(), bulk])) @ Q.T
    A = (A + A.T) / 2
    obj = Objective(
        nn.Linear(dim, 1, bias=False).double(),
        [A],
        loss_fn=lambda m, A: 0.5 * (m.weight[0] @ A @ m.weight[0]),
        dtype=torch.float64,
    )
    return obj, torch.linalg.eigvalsh(A)


@pytest.mark.parametrize(("which", "k"), [("largest", 1), ("smallest", 1), ("largest", 3), ("smallest", 3)])
def test_lanczos_at_its_default_tolerance_is_that_accurate_from_any_start(which, k):
    obj, exact = trained_net_quadratic()
    wanted = exact.flip(0)[:k] if which == "largest" else exact[:k]
    errors = []
    for seed in range(20):
        found = hessian_eigenvalues(obj, k=k, which=which, method="lanczos", seed=seed).eigenvalues
        errors.append(float(((found - wanted).abs() / wanted.abs()).max()))
    assert max(errors) <= 1e-3  # the promised relative accuracy `tol`, for every value and all 20 start vectors


@pytest.mark.slow
def test_the_hutchpp_interval_has_its_nominal_coverage():
    g = torch.Generator().manual_seed(1)
    B = torch.randn(60, 60, generator=g, dtype=torch.float64)
    A = B @ B.T / 60 + torch.diag(torch.linspace(0, 3, 60, dtype=torch.float64))
    obj = Objective(
        nn.Linear(60, 1, bias=False).double(), [A], loss_fn=lambda m, A: 0.5 * (m.weight[0] @ A @ m.weight[0])
    )
    exact = float(torch.trace(A))
    results = [hessian_trace(obj, n_samples=15, seed=s) for s in range(400)]
    inside = np.mean([lo <= exact <= hi for lo, hi in (r.interval(0.95) for r in results)])
    naive = np.mean([abs(r.estimate - exact) <= 2 * r.std_error for r in results])
    assert 0.92 <= inside <= 0.98  # Student t with n - 1 = 4 degrees of freedom: nominal 95%
    assert naive < inside  # plus or minus two standard errors undercovers at 5 random samples


@pytest.mark.slow
def test_the_data_parallel_noise_estimators_are_unbiased_with_unequal_rank_batches():
    """Per-sample gradients G + noise (covariance diag(s^2)); 2 ranks with 16 and 3 samples (an epoch's last batch),
    averaged as DDP does. The estimators average to the true |G|^2 and tr(Sigma)."""
    from lightning_landscape.curvature import two_batch_noise

    g = torch.Generator().manual_seed(0)
    G, s = torch.tensor([0.3, -0.2, 0.5, 0.1], dtype=torch.float64), torch.tensor([1.0, 2.0, 0.5, 1.5])
    sizes = (16, 3)
    estimates = []
    for _ in range(20000):
        per_rank = [G + (torch.randn(b, 4, generator=g, dtype=torch.float64) * s).mean(0) for b in sizes]
        mean_local_sq = float(sum(r.pow(2).sum() for r in per_rank)) / 2
        global_sq = float(torch.stack(per_rank).mean(0).pow(2).sum())
        estimates.append(two_batch_noise(mean_local_sq, global_sq, sum(1 / b for b in sizes) / 2, 2))
    g2, trace = np.mean(estimates, axis=0)
    assert g2 == pytest.approx(float(G.pow(2).sum()), rel=0.05)
    assert trace == pytest.approx(float(s.double().pow(2).sum()), rel=0.03)


def test_lanczos_basis_stops_at_the_memory_cap_and_says_so():
    from lightning_landscape.curvature.lanczos import lanczos_tridiagonal

    H = torch.diag(torch.linspace(1.0, 100.0, 100, dtype=torch.float64))
    info: dict = {}
    alpha, beta, basis = lanczos_tridiagonal(
        lambda v: H @ v, torch.ones(100, dtype=torch.float64), 60, max_vectors=10, info=info
    )
    assert info["stopped"] == "memory" and len(alpha) == 10 and len(beta) == 9 and basis.shape == (100, 10)
    torch.testing.assert_close(basis.T @ basis, torch.eye(10, dtype=torch.float64))  # still orthonormal
    info = {}
    lanczos_tridiagonal(lambda v: H @ v, torch.ones(100, dtype=torch.float64), 60, max_vectors=1000, info=info)
    assert info["stopped"] == "steps"


@pytest.mark.parametrize("seed", range(5))
def test_power_iteration_is_converged_only_within_tol_of_a_close_top_pair(seed):
    # a top pair 1.00 / 0.97: the change of the Rayleigh quotient falls below 1e-3 long before it is within 1e-3
    eigs = torch.cat([torch.tensor([1.0, 0.97]), torch.linspace(0.01, 0.5, 38)]).double()
    obj, _ = quadratic(eigs)
    res = hessian_eigenvalues(obj, k=1, tol=1e-3, method="power", seed=seed, max_iter=20000)
    assert res.converged
    assert abs(float(res.eigenvalues[0]) - 1.0) <= 1e-3


def test_lanczos_asks_for_more_eigenvalues_than_the_start_vector_s_krylov_space_holds():
    # H = 0 (a loss linear in the parameters) and H = diag(2, 2, 2, 1, 1, 1): Krylov spaces of dimension 1 and 2
    linear = Objective(nn.Linear(3, 2), [torch.randn(4, 3)], lambda m, x: m(x).sum())
    res = hessian_eigenvalues(linear, k=3)
    assert res.eigenvalues.tolist() == [0.0, 0.0, 0.0] and res.converged
    obj, _ = quadratic([2.0, 2.0, 2.0, 1.0, 1.0, 1.0])
    assert hessian_eigenvalues(obj, k=4).eigenvalues.tolist() == pytest.approx([2.0, 2.0, 2.0, 1.0])
    assert hessian_eigenvalues(obj, k=4, which="smallest").eigenvalues.tolist() == pytest.approx([1.0, 1.0, 1.0, 2.0])
