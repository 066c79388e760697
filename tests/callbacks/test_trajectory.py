"""TrajectoryRecorder and the trajectory store: statistics by hand, JL sketches, crash + resume, DDP."""

import itertools
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import wandb
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lightning_landscape import TrajectoryRecorder, TrajectoryStore
from lightning_landscape.dynamics import SparseProjection, common_projection
from tests.ddp import run_script
from tests.helpers import assert_identical_runs, fit, loader, offline_wandb_records, tiny_module_class


class ParamHistory(Callback):
    """Records what the statistics must be computed from: parameters after each step and the gradients."""

    def __init__(self):
        self.params, self.grads, self.losses = [], [], []

    def on_train_start(self, trainer, pl_module):
        self.params.append(torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()]).clone())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append(torch.cat([p.grad.reshape(-1) for p in pl_module.parameters()]).clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.params.append(torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()]).clone())


def train(tmp_path, recorder, history=None, **trainer_kwargs):
    pl.seed_everything(0)
    model = tiny_module_class()(batch_norm=False, dropout=0.0)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=CSVLogger(tmp_path),
        enable_progress_bar=False,
        enable_checkpointing=False,
        log_every_n_steps=2,
        callbacks=[recorder] + ([history] if history else []),
        **trainer_kwargs,
    )
    trainer.fit(model, train_dataloaders=loader(96, 16))
    return trainer, TrajectoryStore.open(recorder.store_dir)


def test_statistics_equal_hand_computed_values(tmp_path):
    recorder = TrajectoryRecorder(
        sketch_dim=32,
        sketch_every_n_steps=1,
        vector_stats_every_n_steps=1,
        sketch_nnz=4,
        flush_every_n_steps=4,
        snapshot_every_n_steps=5,
    )
    history = ParamHistory()
    _, store = train(tmp_path, recorder, history)
    theta = torch.stack(history.params).double()
    n = len(theta) - 1
    assert store.steps.tolist() == list(range(1, n + 1)) and n == 12
    updates = theta[1:] - theta[:-1]
    np.testing.assert_allclose(store.stats["update_norm"], updates.norm(dim=1), rtol=1e-5)
    np.testing.assert_allclose(store.stats["grad_norm"], torch.stack(history.grads).double().norm(dim=1), rtol=1e-5)
    np.testing.assert_allclose(store.stats["distance"], (theta[1:] - theta[0]).norm(dim=1), rtol=1e-5)
    np.testing.assert_allclose(
        store.stats["relative_distance"], (theta[1:] - theta[0]).norm(dim=1) / theta[0].norm(), rtol=1e-5
    )
    cos = torch.nn.functional.cosine_similarity(updates[1:], updates[:-1], dim=1)
    np.testing.assert_allclose(store.stats["update_cosine"][1:], cos, rtol=1e-4, atol=1e-6)
    assert math.isnan(store.stats["update_cosine"][0])
    np.testing.assert_allclose(store.stats["loss"], history.losses, rtol=1e-6)
    assert np.all(store.stats["lr"] == 0.1) and np.allclose(store.stats["lr_over_batch"], 0.1 / 16)
    # per-layer distances add up to the total
    np.testing.assert_allclose(
        np.sqrt((store.layer_distance.astype(np.float64) ** 2).sum(1)), store.stats["distance"], rtol=1e-5
    )
    # sketches are R theta_t with the recorded seed; snapshots are the parameters
    projection = SparseProjection(theta.shape[1], 32, store.meta["projection_seed"], store.meta["nnz"])
    np.testing.assert_allclose(store.sketches, projection(theta[1:].float()).numpy(), rtol=1e-5, atol=1e-6)
    assert store.snapshot_steps == [5, 10]
    np.testing.assert_allclose(store.snapshot(10), theta[10].numpy(), rtol=1e-6)
    np.testing.assert_allclose(store.snapshot("init"), theta[0].numpy(), rtol=1e-6)
    assert store.meta["names"][0] == "net.0.weight" and store.meta["k"] == 32
    # scalars every log_every_n_steps
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "landscape-trajectory/update_norm" in metrics


@pytest.mark.slow
def test_sketch_preserves_distances_johnson_lindenstrauss():
    P, k = 20_000, 256
    g = torch.Generator().manual_seed(0)
    points = (
        torch.randn(30, P, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 30, dtype=torch.float64)[:, None]
    )
    R = SparseProjection(P, k, seed=1)
    sketched = R(points)
    ratios = [
        float((sketched[i] - sketched[j]).norm() / (points[i] - points[j]).norm())
        for i, j in itertools.combinations(range(30), 2)
    ]
    assert min(ratios) > 0.8 and max(ratios) < 1.2  # eps = 0.2 for 435 pairs at k = 256
    assert abs(np.mean(np.square(ratios)) - 1) < 0.02  # E |Rx|^2 = |x|^2
    # each column has nnz entries +-1/sqrt(nnz): basis vectors keep norm 1 exactly
    basis = torch.eye(P, dtype=torch.float64)[:50]
    torch.testing.assert_close(R(basis).norm(dim=1), torch.ones(50, dtype=torch.float64))
    assert torch.equal(SparseProjection(P, k, seed=1)(points[0]), R(points[0]))  # seeded
    with pytest.raises(ValueError, match="multiple of `nnz`"):
        SparseProjection(P, 250, nnz=4)


def test_gradient_accumulation_and_bf16_autocast_count_optimizer_steps(tmp_path):
    recorder = TrajectoryRecorder(sketch_dim=16, vector_stats_every_n_steps=2)
    trainer, store = train(tmp_path, recorder, accumulate_grad_batches=2, precision="bf16-mixed")
    assert trainer.global_step == 6 and store.steps.tolist() == [1, 2, 3, 4, 5, 6]
    assert np.all(np.isfinite(store.stats["grad_norm"])) and np.allclose(store.stats["lr_over_batch"], 0.1 / 32)
    # vector statistics at every 2nd step only, exact there (update = theta_t - theta_{t-1})
    assert np.isnan(store.stats["update_norm"][0]) and np.all(np.isfinite(store.stats["update_norm"][1::2]))
    assert np.all(np.isfinite(store.stats["update_cosine"][3::2]))
    assert np.isnan(store.layer_distance[0]).all() and np.isfinite(store.layer_distance[1]).all()


def test_recorder_does_not_disturb_training(tmp_path):
    plain = fit("lightning.pytorch", [], tmp_path / "plain")
    recorder = TrajectoryRecorder(
        sketch_dim=16,
        snapshot_every_n_steps=3,
        flush_every_n_steps=2,
        vector_stats_every_n_steps=1,
        sketch_every_n_steps=1,
    )
    observed = fit("lightning.pytorch", [recorder], tmp_path / "observed")
    assert_identical_runs(plain, observed)
    assert len(TrajectoryStore.open(recorder.store_dir).steps) == 12


@pytest.mark.slow
def test_store_figure_and_artifact_reach_wandb(tmp_path):
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="ll-test")
    recorder = TrajectoryRecorder(sketch_dim=16)
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=logger,
        callbacks=[recorder],
        enable_progress_bar=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    trainer.fit(tiny_module_class()(), train_dataloaders=loader())
    keys = set(logger.experiment.summary.keys())
    assert {"landscape-trajectory/trajectory", "landscape-trajectory/loss", "landscape-trajectory/disk_mb"} <= keys
    wandb.finish()
    assert b"trajectory-store" in offline_wandb_records(tmp_path, b"trajectory-store")
    assert (recorder.reporter.run_dir / "trajectory-step0000006.png").exists()


@pytest.mark.slow
def test_several_runs_project_onto_a_common_basis(tmp_path):
    stores = []
    for seed in (0, 1):
        pl.seed_everything(seed)
        recorder = TrajectoryRecorder(sketch_dim=16, sketch_every_n_steps=1, store_dir=str(tmp_path / f"run{seed}"))
        trainer = pl.Trainer(
            max_epochs=1,
            accelerator="cpu",
            logger=False,
            default_root_dir=tmp_path,
            callbacks=[recorder],
            enable_progress_bar=False,
            enable_checkpointing=False,
        )
        trainer.fit(tiny_module_class()(), train_dataloaders=loader())
        stores.append(TrajectoryStore.open(recorder.store_dir))
    coords, components, mean, ratio = common_projection([s.sketches for s in stores])
    assert [c.shape for c in coords] == [(6, 2), (6, 2)] and components.shape == (2, 16)
    np.testing.assert_allclose(coords[1], (stores[1].sketches - mean) @ components.T, rtol=1e-5)
    assert 0 < ratio.sum() <= 1
    with pytest.raises(ValueError, match="different sketch sizes"):
        common_projection([stores[0].sketches, stores[1].sketches[:, :8]])
    with pytest.raises(FileNotFoundError, match="No trajectory store"):
        TrajectoryStore.open(tmp_path / "nothing")


@pytest.mark.ddp
def test_sigkill_leaves_a_readable_store_and_resume_continues_it(tmp_path):
    full = TrajectoryStore.open(run_script("trajectory", tmp_path, 1, "full", str(tmp_path))["store"])
    run_script("trajectory", tmp_path, 1, "kill", str(tmp_path), expect_kill=True)
    crashed = TrajectoryStore.open(tmp_path / "crash" / "store")
    assert crashed.steps.tolist() == list(range(1, 16))  # killed at step 18: every step up to the flush at 15
    resumed = TrajectoryStore.open(run_script("trajectory", tmp_path, 1, "resume", str(tmp_path))["store"])
    assert resumed.steps.tolist() == full.steps.tolist() == list(range(1, 37))  # no duplicates, no gaps
    for key in ("loss", "grad_norm", "update_norm", "distance", "update_cosine"):
        np.testing.assert_allclose(resumed.stats[key], full.stats[key], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(resumed.sketches, full.sketches, rtol=1e-5, atol=1e-6)
    assert resumed.snapshot_steps == full.snapshot_steps == [12, 24, 36]


@pytest.mark.ddp
def test_two_ddp_ranks_record_the_single_process_store(tmp_path):
    single = TrajectoryStore.open(run_script("trajectory", tmp_path, 1, "full", str(tmp_path))["store"])
    ddp = TrajectoryStore.open(run_script("trajectory", tmp_path, 2, "full", str(tmp_path))["store"])
    assert ddp.steps.tolist() == single.steps.tolist() == list(range(1, 37))
    for key in ("loss", "grad_norm", "update_norm", "distance", "lr_over_batch"):
        np.testing.assert_allclose(ddp.stats[key], single.stats[key], rtol=1e-4, atol=1e-7, err_msg=key)
    np.testing.assert_allclose(ddp.sketches, single.sketches, rtol=1e-4, atol=1e-6)
    assert ddp.meta["world_size"] == 2
    for key in ("b_simple", "grad_noise_trace", "temperature"):  # from per-rank versus global gradients
        assert key in ddp.stats and key not in single.stats
    assert np.all(ddp.stats["grad_noise_trace"][5:] > 0)
