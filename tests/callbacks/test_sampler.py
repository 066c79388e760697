"""Slices, directions, interpolation and the LandscapeSampler callback against exact answers."""

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import wandb
from lightning.pytorch.loggers import WandbLogger
from torch import nn

from lightning_landscape import LandscapeSampler, Objective, ParameterLayout, TrajectoryRecorder
from lightning_landscape.geometry import (
    evaluate_slice,
    interpolate,
    nonconvexity_map,
    pca_directions,
    plane_coordinates,
    random_direction,
)
from lightning_landscape.geometry.slices import AffineInputLayers
from tests.ddp import run_script
from tests.helpers import assert_identical_runs, blobs, fit, loader, tiny_module_class, trainer_for


def quadratic(A):
    module = nn.Linear(A.shape[0], 1, bias=False).double()
    return Objective(module, [A], lambda m, A: 0.5 * (m.weight[0] @ A @ m.weight[0]), dtype=torch.float64)


def test_plane_equals_the_closed_form_on_a_quadratic():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(5, 5, generator=g, dtype=torch.float64)
    A = M @ M.T - 2 * torch.eye(5, dtype=torch.float64)  # indefinite
    obj = quadratic(A)
    c, d1, d2 = torch.randn(3, 5, generator=g, dtype=torch.float64)
    axis = torch.linspace(-1, 1, 9, dtype=torch.float64)
    coords = plane_coordinates(axis, axis)
    grid = evaluate_slice(obj, c, torch.stack([d1, d2]), coords, memory_mb=1e-4)  # tiny chunks
    points = c + coords[:, :1] * d1 + coords[:, 1:] * d2
    exact = 0.5 * torch.einsum("ni,ij,nj->n", points, A, points)
    torch.testing.assert_close(grid, exact, rtol=1e-12, atol=1e-12)
    shard = evaluate_slice(obj, c, torch.stack([d1, d2]), coords, points=range(10, 30))
    torch.testing.assert_close(shard, exact[10:30], rtol=1e-12, atol=1e-12)


def test_grid_values_equal_one_by_one_evaluation_on_a_network():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = blobs(64).tensors
    obj = Objective(net, [(x, y)], lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))
    center = obj.theta0
    dirs = torch.stack([random_direction(obj.layout, center, s) for s in (0, 1)])
    coords = plane_coordinates(torch.linspace(-1, 1, 5), torch.linspace(-1, 1, 5))
    grid = evaluate_slice(obj, center, dirs, coords)
    one_by_one = torch.stack([obj.loss(center + c @ dirs) for c in coords])
    torch.testing.assert_close(grid, one_by_one, rtol=1e-5, atol=1e-6)


def test_affine_input_layers_give_the_same_grid_with_the_first_layer_run_once_per_direction():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 3))
    x, y = torch.randn(40, 3, 4), torch.randint(0, 3, (40,))
    obj = Objective(
        net,
        [(x[:24], y[:24]), (x[24:], y[24:])],
        lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
        dtype=torch.float64,
    )
    center = obj.theta0
    dirs = torch.stack([random_direction(obj.layout, center, s) for s in (0, 1)])
    coords = plane_coordinates(
        torch.linspace(-1, 1, 6, dtype=torch.float64), torch.linspace(-1, 1, 6, dtype=torch.float64)
    )
    affine = AffineInputLayers(obj, center, dirs)
    assert list(affine.layers) == ["1"]  # the first Linear reads the (flattened) batch; the second does not
    calls = []
    original = nn.Linear.forward

    def counting(self, x):
        calls.append(self)
        return original(self, x)

    nn.Linear.forward = counting
    try:
        fast = evaluate_slice(obj, center, dirs, coords, method="affine")
    finally:
        nn.Linear.forward = original
    # the first layer runs only for detection (2 points x 2 batches), never per grid point; the second once per
    # batch and chunk of points (vmapped over the chunk)
    chunks = -(-len(coords) // obj.chunk_size)
    assert calls.count(net[1]) == 4 and calls.count(net[3]) == 4 + 2 * chunks
    exact = evaluate_slice(obj, center, dirs, coords, method="batched")
    torch.testing.assert_close(fast, exact, rtol=1e-12, atol=1e-12)
    affine._vmap_ok = False  # the one-point-at-a-time fallback gives the same numbers
    torch.testing.assert_close(affine.losses(coords), exact, rtol=1e-12, atol=1e-12)
    assert "forward" not in vars(net[1])  # restored


def test_filter_normalization_gives_every_filter_the_weights_norm():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    layout = ParameterLayout.from_module(net)
    theta = layout.flatten(dict(net.named_parameters()))
    d = layout.unflatten(random_direction(layout, theta, seed=3))
    w = dict(net.named_parameters())
    torch.testing.assert_close(d["0.weight"].flatten(1).norm(dim=1), w["0.weight"].flatten(1).norm(dim=1))
    torch.testing.assert_close(d["3.weight"].norm(dim=1), w["3.weight"].norm(dim=1))
    for name in ("0.bias", "1.weight", "1.bias", "3.bias"):  # biases and BatchNorm ignored
        assert torch.count_nonzero(d[name]) == 0
    layer = layout.unflatten(random_direction(layout, theta, seed=3, normalization="layer", ignore_1d=False))
    assert torch.isclose(layer["1.weight"].norm(), w["1.weight"].norm())
    model = random_direction(layout, theta, seed=3, normalization="model")
    assert torch.isclose(model.norm(), theta.norm())
    assert torch.equal(random_direction(layout, theta, seed=3), random_direction(layout, theta, seed=3))


def test_interpolation_barrier_of_a_double_well():
    module = nn.Linear(2, 1, bias=False).double()
    obj = Objective(
        module, [torch.zeros(1)], lambda m, _: (m.weight[0, 0] ** 2 - 1) ** 2 + m.weight[0, 1] ** 2, dtype=torch.float64
    )
    a, b = torch.tensor([-1.0, 0.0], dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64)
    result = interpolate(obj, a, b, steps=21)
    assert result.barrier == pytest.approx(1.0)  # L(0, 0) = 1, both ends 0
    np.testing.assert_allclose(result.losses, (np.linspace(-1, 1, 21) ** 2 - 1) ** 2, atol=1e-12)


def test_recomputed_batchnorm_statistics_are_the_probe_set_moments():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    x = torch.randn(64, 3)
    obj = Objective(net, [x[:32], x[32:]], lambda m, b: m(b).pow(2).mean())
    theta = obj.theta0 + 0.5
    before = {k: v.clone() for k, v in net.state_dict().items()}
    stats = obj.batchnorm_statistics(theta)
    params = obj.layout.unflatten(theta)
    h = x @ params["0.weight"].T + params["0.bias"]
    torch.testing.assert_close(stats["1.running_mean"], h.mean(0), rtol=1e-5, atol=1e-6)
    batch_vars = torch.stack([h[:32].var(0), h[32:].var(0)]).mean(0)  # unbiased, averaged over batches
    torch.testing.assert_close(stats["1.running_var"], batch_vars, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # module untouched
    with_bn = interpolate(obj, obj.theta0, theta, steps=3, recompute_bn=True)
    assert with_bn.recompute_bn and with_bn.losses[-1] == pytest.approx(float(obj.loss(theta, stats)), rel=1e-6)


def test_pca_directions_of_a_planar_trajectory():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(50, 2, generator=g, dtype=torch.float64))[0].T
    coords = torch.randn(20, 2, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0], dtype=torch.float64)
    trajectory = coords @ basis + 1.0
    dirs, ratio, projected = pca_directions(trajectory)
    assert ratio.sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(dirs @ dirs.T, torch.eye(2, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(projected @ dirs + trajectory[-1], trajectory, atol=1e-10, rtol=0)


def test_nonconvexity_map_of_a_saddle():
    obj = quadratic(torch.diag(torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)))
    coords = plane_coordinates(
        torch.linspace(-1, 1, 2, dtype=torch.float64), torch.linspace(-1, 1, 2, dtype=torch.float64)
    )
    dirs = torch.eye(3, dtype=torch.float64)[:2]
    np.testing.assert_allclose(nonconvexity_map(obj, torch.zeros(3, dtype=torch.float64), dirs, coords), 0.5, rtol=1e-6)


@pytest.mark.slow
def test_sampler_with_recorder_logs_every_picture_and_keeps_training_unchanged(tmp_path):
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="ll-test")
    recorder = TrajectoryRecorder(sketch_dim=16, snapshot_every_n_steps=2)
    sampler = LandscapeSampler(every_n_epochs=1, probe={"size": 32}, slices={"resolution": 6, "line_points": 7})
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=logger,
        callbacks=[recorder, sampler],
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    trainer.fit(tiny_module_class()(), train_dataloaders=loader())
    assert sampler.runs == 1 and sampler.failures == 0
    keys = set(logger.experiment.summary.keys())
    for key in (
        "slice",
        "surface",
        "grid",
        "profile",
        "pca_plane",
        "pca_trajectory",
        "interpolation",
        "barrier_init",
        "pca_explained",
        "roughness",
    ):
        assert f"landscape-slices/{key}" in keys, key
    wandb.finish()
    saved = np.load(sampler.reporter.run_dir / "landscape-step0000006.npz")
    assert saved["plane"].shape == (6, 6) and saved["pca_coords"].shape == (4, 2)  # snapshots 2, 4, 6 and current
    assert saved["pca_off_plane"][-1] == pytest.approx(0.0, abs=1e-5)  # the current point is the plane's origin
    # the slice of a BatchNorm + dropout model leaves training bit-identical
    plain = fit("lightning.pytorch", [], tmp_path / "plain")
    observed = fit(
        "lightning.pytorch",
        [LandscapeSampler(every_n_steps=2, probe={"size": 32}, slices={"resolution": 4, "line_points": 5})],
        tmp_path / "observed",
    )
    assert_identical_runs(plain, observed)


@pytest.mark.ddp
def test_two_ranks_compute_the_single_process_grid(tmp_path):
    single = run_script("landscape", tmp_path, 1)
    ddp = run_script("landscape", tmp_path, 2)
    np.testing.assert_allclose(ddp["plane"], single["plane"], rtol=1e-5)
    np.testing.assert_allclose(ddp["profile"], single["profile"], rtol=1e-5)
    assert len(ddp["plane"]) == 7 and ddp["history"][0]["center_loss"] == pytest.approx(
        single["history"][0]["center_loss"]
    )


@pytest.mark.ddp
def test_fsdp2_ranks_compute_the_single_process_grid_from_gathered_parameters(tmp_path):
    """Two ranks of ModelParallelStrategy with ``fully_shard``: the sampler gathers the sharded parameters (its own
    snapshots too) and splits the grid as under DDP; the slices equal one process's on the unsharded model."""
    single = run_script("landscape", tmp_path, 1)
    fsdp = run_script("landscape", tmp_path, 2, "fsdp2")
    np.testing.assert_allclose(fsdp["plane"], single["plane"], rtol=1e-5)
    np.testing.assert_allclose(fsdp["profile"], single["profile"], rtol=1e-5)
    assert fsdp["history"][0]["center_loss"] == pytest.approx(single["history"][0]["center_loss"])


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match=r"`slices\.resolution`"):
        LandscapeSampler(slices={"resolution": 1})
    with pytest.raises(ValueError, match=r"`slices\.normalization`"):
        LandscapeSampler(slices={"normalization": "per-filter"})
    with pytest.raises(ValueError, match=r"`slices\.span`"):
        LandscapeSampler(slices={"span": 0})


@pytest.mark.slow
@pytest.mark.parametrize("min_points", [14, 10**12])
def test_the_slices_use_the_probe_batches_the_budget_affords(tmp_path, monkeypatch, min_points):
    from lightning_landscape.callbacks import sampler as sampler_module

    monkeypatch.setattr(sampler_module, "MIN_POINTS", min_points)  # 10**12 losses: no budget holds them
    model = tiny_module_class()(batch_norm=False, dropout=0.0)
    sampler = LandscapeSampler(
        every_n_steps=2, at_fit_end=False, progress=False, probe={"size": 64, "batch_size": 16},
        slices={"resolution": 3, "line_points": 5},
    )  # fmt: skip
    trainer = trainer_for(tmp_path, [sampler], max_steps=2)
    trainer.fit(model, loader())
    last = sampler.history[-1]
    batches = sampler.probe_set(trainer)[: 1 if min_points > 14 else 4]
    assert last["probe_fraction"] == (0.25 if min_points > 14 else 1.0)
    assert last["center_loss"] == pytest.approx(float(Objective(model, batches).loss()), rel=1e-6)
