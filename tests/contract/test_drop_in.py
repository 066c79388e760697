"""The drop-in contract on the module shapes people write (tests/shapes.py): with all four callbacks triggered often,
training is exactly what it is without them, and every callback really ran; where a callback cannot work with its
defaults, it says so before the first training step, naming the argument that fixes it."""

import csv
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_landscape import EnergyLandscape, FlatnessMonitor, LandscapeSampler, TrajectoryRecorder
from lightning_landscape.dynamics import MinimaDatabase, TrajectoryStore
from lightning_landscape.objective import Objective
from tests.shapes import SHAPES, AutoEncoder, BatchNormNet, FinetunedNet, TemplateModule, image_loader


class ThreadCount(pl.Callback):
    """Records torch's thread count before every training batch."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def on_train_batch_start(self, *args) -> None:
        self.counts.append(torch.get_num_threads())


def our_callbacks(loss_fn=None, outputs_fn=None):
    probe = {"size": 32, "loss_fn": loss_fn}
    common = {"probe": probe, "progress": False}
    return [
        TrajectoryRecorder(
            sketch_dim=16, sketch_every_n_steps=1, vector_stats_every_n_steps=1, snapshot_every_n_steps=2
        ),
        FlatnessMonitor(
            every_n_steps=3, measures=["lambda_max", "trace", "gradient_noise"], **common, spectrum={"trace_samples": 3}
        ),
        LandscapeSampler(every_n_steps=4, interpolation_steps=3, **common, slices={"resolution": 3, "line_points": 3}),
        EnergyLandscape(
            every_n_steps=5,
            progress=False,
            sampling={"replicas": 2, "steps": 10, "record_every": 1, "pool_batches": 2},
            quench={"max_iter": 5},
            paths={"images": 3, "steps": 5},
            probe={**probe, "outputs_fn": outputs_fn},
        ),
    ]


def run(shape, root, callbacks):
    pl.seed_everything(3)
    threads = ThreadCount()
    model = shape.module()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        deterministic=True,
        logger=CSVLogger(root, name="run"),
        callbacks=[*shape.callbacks(), threads, *callbacks],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        **shape.trainer,
    )
    trainer.fit(model, train_dataloaders=shape.loader())
    with open(f"{trainer.logger.log_dir}/metrics.csv") as fh:
        rows = [{k: v for k, v in r.items() if v and not k.startswith("landscape-")} for r in csv.DictReader(fh)]
    return model, trainer, [r for r in rows if len(r) > 1], threads.counts


def assert_same_training(plain, observed):
    (model_a, trainer_a, metrics_a, threads_a), (model_b, trainer_b, metrics_b, threads_b) = plain, observed
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:  # weights, BatchNorm statistics
        assert torch.equal(state_a[key], state_b[key]), key
    assert [p.requires_grad for p in model_a.parameters()] == [p.requires_grad for p in model_b.parameters()]
    for opt_a, opt_b in zip(trainer_a.optimizers, trainer_b.optimizers, strict=True):
        sa, sb = opt_a.state_dict(), opt_b.state_dict()
        assert sa["param_groups"] == sb["param_groups"]
        for key, state in sa["state"].items():
            for name, value in state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb["state"][key][name])), name
    assert metrics_a and metrics_a == metrics_b  # the user's logged metrics, every row, every column
    assert threads_a == threads_b


@pytest.mark.parametrize("name", list(SHAPES))
def test_every_callback_leaves_the_users_training_unchanged(tmp_path, name):
    shape = SHAPES[name]
    plain = run(shape, tmp_path / "plain", [])
    callbacks = our_callbacks(shape.loss_fn, shape.outputs_fn)
    observed = run(shape, tmp_path / "observed", callbacks)
    assert_same_training(plain, observed)
    recorder, *analyses = callbacks
    assert recorder.failures == 0
    store = TrajectoryStore.open(recorder.store_dir)
    assert len(store.steps) == observed[1].fit_loop.epoch_loop._batches_that_stepped  # a row per stepping batch
    for callback in analyses:
        assert callback.failures == 0 and callback.runs >= 2, type(callback).__name__
    if name == "gan":  # a manual-optimization training_step that returns nothing has no loss to record
        assert np.isnan(store.stats["loss"]).all()
    else:
        assert np.isfinite(store.stats["loss"]).all()


def test_gan_without_loss_fn_is_refused_in_setup_naming_loss_fn(tmp_path):
    shape = SHAPES["gan"]
    for callback in our_callbacks()[1:]:
        trainer = pl.Trainer(max_epochs=1, logger=False, default_root_dir=tmp_path, callbacks=[callback])
        model = shape.module()
        with pytest.raises(ValueError, match=r"manual optimization.*loss_fn"):
            trainer.fit(model, train_dataloaders=shape.loader())
        assert trainer.global_step == 0


def test_default_outputs_that_cannot_work_fail_before_the_first_step_naming_outputs_fn(tmp_path):
    energy = EnergyLandscape(every_n_steps=100, progress=False, probe={"size": 32})
    trainer = pl.Trainer(max_epochs=1, logger=False, default_root_dir=tmp_path, callbacks=[energy])
    model = AutoEncoder()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="outputs_fn"):
        trainer.fit(model, train_dataloaders=image_loader())
    assert trainer.global_step == 0 and all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_a_default_loss_that_cannot_work_fails_before_the_first_step_naming_loss_fn(tmp_path):
    class NoLoss(TemplateModule):
        def training_step(self, batch, batch_idx):
            super().training_step(batch, batch_idx)  # returns nothing

    trainer = pl.Trainer(max_epochs=1, logger=False, default_root_dir=tmp_path, callbacks=[FlatnessMonitor()])
    with pytest.raises(RuntimeError, match=r"NoLoss.training_step.*loss_fn"):
        trainer.fit(NoLoss(), train_dataloaders=SHAPES["template"].loader())
    assert trainer.global_step == 0


def test_metric_states_survive_an_analysis_exactly():
    model = TemplateModule()
    x, y = next(iter(SHAPES["template"].loader()))
    model.train_loss(torch.tensor(2.0))
    model.train_acc(model(x), y)
    saved = {n: (m.metric_state, m._update_count) for n, m in model.named_children() if n.startswith("train_")}
    objective = Objective(model, [(x, y)])
    objective.losses(objective.theta0 + 0.01 * torch.randn(4, objective.numel))  # under vmap
    objective.grad()
    from lightning_landscape.curvature import gradient_moments

    gradient_moments(objective)  # per-sample gradients: vmap over samples
    for name, (state, count) in saved.items():
        metric = getattr(model, name)
        assert metric._update_count == count, name
        for key, value in state.items():
            assert torch.equal(metric.metric_state[key], value), (name, key)
    assert math.isclose(float(model.train_loss.compute()), 2.0)


@pytest.mark.slow
def test_batchnorm_minima_keep_their_loss_across_triggers(tmp_path):
    energy = EnergyLandscape(
        every_n_steps=4,
        progress=False,
        sampling={"replicas": 2, "steps": 10},
        quench={"max_iter": 10},
        paths={"steps": 30},
        probe={"size": 32},
    )
    trainer = pl.Trainer(
        max_epochs=2, logger=False, default_root_dir=tmp_path, callbacks=[energy], enable_progress_bar=False
    )
    model = BatchNormNet()
    trainer.fit(model, train_dataloaders=SHAPES["batchnorm"].loader())
    assert energy.runs >= 3 and energy.failures == 0
    db = MinimaDatabase(energy.minima_dir)
    # evaluated now, with the module's statistics of the end of training, every minimum has its recorded loss
    objective = Objective(model, energy.probe_set(trainer), bn_mode="train")
    for record in db.records:
        assert float(objective.loss(torch.from_numpy(db.theta(record["id"])).float())) == pytest.approx(
            record["loss"], rel=1e-4, abs=1e-6
        )
    with pytest.raises(ValueError, match=r"bn_mode='eval'.*BatchNorm"):
        pl.Trainer(
            max_epochs=1,
            logger=False,
            default_root_dir=tmp_path,
            callbacks=[EnergyLandscape(probe={"bn_mode": "eval"})],
        ).fit(BatchNormNet(), train_dataloaders=SHAPES["batchnorm"].loader())


def test_unfrozen_layers_join_the_analyses_and_the_recorded_path(tmp_path):
    shape = SHAPES["finetuning"]
    recorder = TrajectoryRecorder(sketch_dim=16, vector_stats_every_n_steps=1)
    monitor = FlatnessMonitor(every_n_steps=2, progress=False, probe={"size": 32})
    model = FinetunedNet()
    trainer = pl.Trainer(
        max_epochs=2,
        logger=False,
        default_root_dir=tmp_path,
        callbacks=[*shape.callbacks(), recorder, monitor],
        enable_progress_bar=False,
    )
    trainer.fit(model, train_dataloaders=shape.loader())
    total = sum(p.numel() for p in model.parameters())
    assert monitor.failures == 0 and monitor._objective.numel == total  # rebuilt with the unfrozen backbone
    store = TrajectoryStore.open(recorder.store_dir)
    assert store.meta["n_params"] == total
    backbone = [i for i, n in enumerate(store.meta["names"]) if n.startswith("backbone")]
    moved = store.layer_distance[:, backbone].max(1)
    assert np.all(moved[:5] == 0) and np.all(moved[-3:] > 0)  # frozen for the first epoch (6 steps), then moving
