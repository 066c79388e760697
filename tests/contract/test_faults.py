"""Faults in a single process: a full disk, sparse gradients, a failing sketch, diverging points. Training goes on,
unchanged, and no recorded data is lost."""

import errno
import json
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_landscape import EnergyLandscape, FlatnessMonitor, TrajectoryRecorder
from lightning_landscape.dynamics import TrajectoryStore
from lightning_landscape.dynamics import store as store_module
from lightning_landscape.report import Reporter
from tests.helpers import loader, tiny_module_class


def fit(root, callbacks, model=None, **kwargs):
    pl.seed_everything(0)
    model = model or tiny_module_class()(batch_norm=False, dropout=0.0)
    settings = {"max_epochs": 2, "accelerator": "cpu", "logger": False, "default_root_dir": root}
    trainer = pl.Trainer(
        callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False, **{**settings, **kwargs}
    )
    trainer.fit(model, loader())
    return model


@pytest.mark.slow
def test_a_full_disk_warns_once_keeps_every_row_and_training_goes_on(tmp_path, monkeypatch):
    plain = fit(tmp_path / "plain", [])
    full = {"on": False}
    savez, event = np.savez, Reporter.event

    def savez_on_a_full_disk(fh, **arrays):
        if full["on"]:
            fh.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        savez(fh, **arrays)

    def event_on_a_full_disk(self, name, record):
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        event(self, name, record)

    class DiskFillsUp(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            full["on"] = 2 <= trainer.global_step < 9  # the disk is full for steps 3 to 9, then space is freed

    monkeypatch.setattr(store_module.np, "savez", savez_on_a_full_disk)
    monkeypatch.setattr(Reporter, "event", event_on_a_full_disk)
    recorder = TrajectoryRecorder(sketch_dim=8, sketch_every_n_steps=1, flush_every_n_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        observed = fit(tmp_path / "observed", [DiskFillsUp(), recorder])
    for a, b in zip(plain.parameters(), observed.parameters(), strict=True):
        assert torch.equal(a, b)  # training unchanged
    ours = [str(w.message) for w in caught if "lightning-landscape" in str(w.message)]
    assert len([m for m in ours if "No space left" in m]) == 1  # one warning for the repeated failure
    assert recorder.failures >= 3  # every failed flush was counted
    store = TrajectoryStore.open(recorder.store_dir)
    assert store.steps.tolist() == list(range(1, 13)) and len(store.sketches) == 12  # no row was lost
    assert not list(store.path.rglob("*.tmp-*"))  # no temporary file left behind


class SparseEmbedding(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4, sparse=True)
        self.head = nn.Linear(4, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        tokens = (x.abs() * 3).long().clamp(max=9)
        return F.cross_entropy(self.head(self.embed(tokens).mean(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_sparse_gradients_are_recorded_with_their_norm(tmp_path):
    norms = []

    class Norms(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            sq = sum(
                float((p.grad.coalesce().values() if p.grad.is_sparse else p.grad).pow(2).sum())
                for p in pl_module.parameters()
            )
            norms.append(sq**0.5)

    recorder = TrajectoryRecorder(sketch_dim=8)
    fit(tmp_path, [Norms(), recorder], model=SparseEmbedding())
    assert recorder.failures == 0
    np.testing.assert_allclose(TrajectoryStore.open(recorder.store_dir).stats["grad_norm"], norms, rtol=1e-5)


def test_a_failing_sketch_keeps_the_rest_of_the_row(tmp_path):
    recorder = TrajectoryRecorder(sketch_dim=8, sketch_every_n_steps=1, vector_stats_every_n_steps=1)

    class BreakSketchAtStep3(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 2:
                self.saved, recorder.projection = recorder.projection, lambda x: 1 / 0
            elif trainer.global_step == 3:
                recorder.projection = self.saved

    fit(tmp_path, [recorder, BreakSketchAtStep3()], max_epochs=1)
    store = TrajectoryStore.open(recorder.store_dir)
    assert recorder.failures == 1
    assert store.steps.tolist() == list(range(1, 7))  # the row of step 3 is there
    assert np.isfinite(store.stats["loss"]).all() and np.isfinite(store.stats["grad_norm"]).all()
    assert store.sketch_steps.tolist() == [1, 2, 4, 5, 6]  # only its sketch is missing


class Regression(pl.LightningModule):
    """Least squares: SGD with a learning rate far above 2 / lambda_max overflows to inf, then NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3, 1)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, _ = batch
        return F.mse_loss(self(x).squeeze(1), x.sum(1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.slow
def test_diverged_replicas_never_become_minima(tmp_path):
    energy = EnergyLandscape(
        every_n_steps=3,
        sampling={"replicas": 4, "steps": 40, "lr": 50.0},
        quench={"max_iter": 5},
        paths={"steps": 3},
        probe={"size": 32},
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, [energy], model=Regression(), max_epochs=1)
    assert energy.failures == 0 and energy.runs >= 2
    assert any("not finite" in str(w.message) for w in caught)
    with open(f"{energy.minima_dir}/minima.json") as fh:
        text = fh.read()

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    data = json.loads(text, parse_constant=refuse)
    assert data["minima"] and all(np.isfinite(m["loss"]) for m in data["minima"])
    assert all(np.isfinite(s["saddle"]) and s["saddle"] < 1e6 for s in data["saddles"])


class Diverges(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_after_diverged_training_the_failure_says_the_parameters_are_not_finite(tmp_path):
    class DivergeAtStep2(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, *args):
            if trainer.global_step == 2:
                with torch.no_grad():
                    pl_module.net.weight.fill_(float("nan"))

    monitor = FlatnessMonitor(every_n_steps=3, probe={"size": 32})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, [DivergeAtStep2(), monitor], model=Diverges(), max_epochs=1)
    assert monitor.failures >= 1
    assert any("parameters are not finite" in str(w.message) for w in caught)


@pytest.mark.slow
def test_a_checkpoint_never_decides_where_we_write_or_delete(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    def run(ckpt_path=None, epochs=1):
        recorder = TrajectoryRecorder(sketch_dim=8, snapshot_every_n_steps=2)
        trainer = pl.Trainer(
            max_epochs=epochs,
            logger=CSVLogger(tmp_path, name="runs"),
            callbacks=[recorder, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
            enable_progress_bar=False,
        )
        trainer.fit(tiny_module_class()(), loader(), ckpt_path=ckpt_path)
        return recorder

    first = run()
    files = {p: p.read_bytes() for p in first.reporter.run_dir.rglob("*") if p.is_file()}
    # another run branches from the first one's checkpoint: it continues the trajectory in its own folder
    branch = run(ckpt_path=tmp_path / "ckpt" / "last.ckpt", epochs=2)
    assert branch.reporter.run_dir != first.reporter.run_dir
    assert TrajectoryStore.open(branch.store_dir).steps.tolist() == list(range(1, 13))
    assert {p: p.read_bytes() for p in first.reporter.run_dir.rglob("*") if p.is_file()} == files  # untouched
    # a crafted checkpoint naming any folder: that folder is at most read, never written or deleted
    victim = tmp_path / "victim"
    TrajectoryStore.open(first.store_dir).copy_to(victim, until_step=6)
    (victim / "chunks" / "000099-000000100-000000200.npz").write_bytes(b"user data")
    before = {p: p.read_bytes() for p in victim.rglob("*") if p.is_file()}
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    key = next(k for k in checkpoint["callbacks"] if "TrajectoryRecorder" in k)
    checkpoint["callbacks"][key].update(store_dir=str(victim), last_step=2)
    torch.save(checkpoint, tmp_path / "crafted.ckpt")
    crafted = run(ckpt_path=tmp_path / "crafted.ckpt", epochs=3)
    assert {p: p.read_bytes() for p in victim.rglob("*") if p.is_file()} == before
    assert Path(crafted.store_dir).is_relative_to(crafted.reporter.run_dir)
