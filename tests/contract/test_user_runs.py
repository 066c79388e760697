"""Single items of the drop-in contract: each of these failed on user code before it was fixed."""

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_landscape import EnergyLandscape, FlatnessMonitor, LandscapeSampler, TrajectoryRecorder
from lightning_landscape.dynamics import MinimaDatabase, TrajectoryStore
from lightning_landscape.guard import preserve_state
from lightning_landscape.objective import Objective
from tests.helpers import blobs, loader, tiny_module_class, trainer_for
from tests.shapes import SHAPES


class RecordsItsLosses(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3, 3)
        self.batch_losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.batch_losses.append(float(loss))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_recorded_loss_under_gradient_accumulation_is_the_mean_batch_loss(tmp_path):
    recorder = TrajectoryRecorder(sketch_dim=8)
    model = RecordsItsLosses()
    trainer = trainer_for(tmp_path, [recorder], accumulate_grad_batches=3, gradient_clip_val=0.1, log_every_n_steps=1)
    trainer.fit(model, loader(96, 8))
    store = TrajectoryStore.open(recorder.store_dir)
    expected = np.asarray(model.batch_losses).reshape(-1, 3).mean(1)  # 12 batches, 4 optimizer steps
    assert store.steps.tolist() == [1, 2, 3, 4]
    np.testing.assert_allclose(store.stats["loss"], expected, rtol=1e-6)
    assert float(trainer.callback_metrics["landscape-trajectory/loss"]) == pytest.approx(expected[-1], rel=1e-6)


def test_preserve_state_restores_thread_count_requires_grad_and_metric_states():
    from deeptime.clustering import KMeans

    model = SHAPES["template"].module()
    model.train_loss(torch.tensor(3.0))
    threads = torch.get_num_threads()
    with preserve_state(model):
        KMeans(n_clusters=2, fixed_seed=0).fit(np.random.default_rng(0).normal(size=(50, 2)))  # sets OpenMP threads
        model.net[0].weight.requires_grad_(False)
        model.train_loss(torch.tensor(100.0))
        model.train_acc.reset()
    assert torch.get_num_threads() == threads
    assert model.net[0].weight.requires_grad
    assert float(model.train_loss.compute()) == 3.0 and model.train_loss._update_count == 1


class BoringModel(pl.LightningModule):
    """Lightning's bug-report model: a loss linear in the parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_a_loss_linear_in_the_parameters_has_a_zero_hessian(tmp_path):
    x = torch.randn(8, 3)
    objective = Objective(BoringModel(), [(x,)])
    v = torch.randn(objective.numel)
    assert torch.equal(objective.hvp(None, v), torch.zeros(objective.numel))
    assert torch.equal(objective.hvp_at()(v), torch.zeros(objective.numel))
    measures = ["lambda_max", "trace", "top_eigenvalues", "lambda_min"]
    monitor = FlatnessMonitor(
        every_n_steps=2, measures=measures, progress=False, probe={"size": 16}, spectrum={"top_k": 3}
    )
    trainer_for(tmp_path, [monitor], max_steps=4).fit(BoringModel(), loader(32, 8))
    assert monitor.failures == 0 and monitor.runs >= 2
    last = monitor.history[-1]
    assert last["lambda_max"] == 0.0 and last["trace"] == 0.0 and last["lambda_min"] == 0.0
    assert [last[f"lambda_{i}"] for i in range(1, 4)] == [0.0, 0.0, 0.0]


class NegativeLoss(pl.LightningModule):
    """A Gaussian negative log-likelihood with a learned variance: its minima have losses below 0."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3, 2)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        mean, log_var = self.net(x).unbind(1)
        target = x[:, 0] + 0.01 * (y.float() - 1)  # nearly a linear function of x: a small variance fits it
        return 0.5 * (log_var + (target - mean) ** 2 / log_var.exp()).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, weight_decay=1e-3)


@pytest.mark.slow
def test_a_negative_loss_gives_minima_basins_and_a_tree(tmp_path):
    energy = EnergyLandscape(
        sampling={"replicas": 4, "steps": 20, "record_every": 2, "lr": 0.05},
        basins={"merge_barrier": 1e-6},  # each minimum its own basin: the tree has something to merge
        progress=False,
        probe={"size": 32},
    )
    trainer_for(tmp_path, [energy], max_steps=3).fit(NegativeLoss(), loader(64, 16))
    assert energy.failures == 0 and energy.runs == 1
    losses = MinimaDatabase(energy.reporter.run_dir / "minima").losses
    assert losses.max() < 0


def test_a_reused_recorder_starts_a_new_store_with_the_new_model(tmp_path):
    recorder = TrajectoryRecorder(sketch_dim=8, vector_stats_every_n_steps=1)
    stores = []
    for seed in (0, 1):
        pl.seed_everything(seed)
        model = tiny_module_class()(batch_norm=False)
        init = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        trainer_for(tmp_path, [recorder]).fit(model, loader())
        store = TrajectoryStore.open(recorder.store_dir)
        final = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        np.testing.assert_allclose(store.snapshot("init"), init.numpy())
        assert store.stats["distance"][-1] == pytest.approx(float((final - init).norm()), rel=1e-5)
        assert store.steps.tolist() == list(range(1, 7))
        stores.append(store.path)
    # logger=False twice in one folder: two run directories, the first store intact
    assert stores[0] != stores[1] and stores[0].parent.parent.parent == stores[1].parent.parent.parent
    assert TrajectoryStore.open(stores[0]).steps.tolist() == list(range(1, 7))


def test_an_explicit_store_dir_of_another_run_is_refused(tmp_path):
    trainer_for(tmp_path, [TrajectoryRecorder(sketch_dim=8, store_dir=str(tmp_path / "store"))]).fit(
        tiny_module_class()(), loader()
    )
    with pytest.raises(ValueError, match=r"`store_dir`.*already holds.*HINT"):
        trainer_for(tmp_path, [TrajectoryRecorder(sketch_dim=8, store_dir=str(tmp_path / "store"))]).fit(
            tiny_module_class()(), loader()
        )
    assert TrajectoryStore.open(tmp_path / "store").steps.tolist() == list(range(1, 7))


def test_the_store_is_found_from_the_log_folder(tmp_path):
    recorder = TrajectoryRecorder(sketch_dim=8)
    trainer = trainer_for(tmp_path, [recorder])
    trainer.fit(tiny_module_class()(), loader())
    assert TrajectoryStore.open(trainer.log_dir).path == TrajectoryStore.open(recorder.store_dir).path


class Stream(IterableDataset):
    def __iter__(self):
        data = blobs(64)
        return iter(data[i] for i in range(len(data)))


def test_an_iterable_dataset_needs_probe_batches_and_works_with_them(tmp_path):
    with pytest.raises(TypeError, match=r"probe=\{'batches'"):
        trainer_for(tmp_path, [FlatnessMonitor(every_n_steps=2)]).fit(
            tiny_module_class()(), DataLoader(Stream(), batch_size=16)
        )
    probe = [blobs(32)[i * 16 : (i + 1) * 16] for i in range(2)]
    monitor = FlatnessMonitor(every_n_steps=2, progress=False, probe={"batches": probe})
    energy = EnergyLandscape(
        every_n_steps=2,
        progress=False,
        sampling={"replicas": 2, "steps": 5},
        quench={"max_iter": 5},
        paths={"steps": 5},
        probe={"batches": probe},
    )
    trainer_for(tmp_path, [monitor, energy]).fit(tiny_module_class()(), DataLoader(Stream(), batch_size=16))
    assert monitor.runs == energy.runs == 2 and monitor.failures == energy.failures == 0
    assert monitor.history[0]["lambda_max"] > 0


@pytest.mark.parametrize(
    ("cls", "kwargs", "name"),
    [
        (FlatnessMonitor, {"spectrum": {"top_k": 2.5}}, "spectrum.top_k"),
        (FlatnessMonitor, {"spectrum": {"trace_samples": "10"}}, "spectrum.trace_samples"),
        (FlatnessMonitor, {"spectrum": {"tol": float("nan")}}, "spectrum.tol"),
        (FlatnessMonitor, {"measures": "trace"}, "measures"),
        (FlatnessMonitor, {"every_n_steps": 0}, "every_n_steps"),
        (FlatnessMonitor, {"probe": {"batches": []}}, "probe.batches"),
        (LandscapeSampler, {"slices": {"resolution": 2.5}}, "slices.resolution"),
        (LandscapeSampler, {"slices": {"span": -1}}, "slices.span"),
        (LandscapeSampler, {"max_snapshots": 2}, "max_snapshots"),
        (TrajectoryRecorder, {"sketch_nnz": 0}, "sketch_nnz"),
        (TrajectoryRecorder, {"sketch_dim": 16.0}, "sketch_dim"),
        (TrajectoryRecorder, {"noise_ema": 1.0}, "noise_ema"),
        (EnergyLandscape, {"paths": {"images": 4.5}}, "paths.images"),
        (EnergyLandscape, {"budget": {"passes": 0}}, "budget.passes"),
        (EnergyLandscape, {"sampling": {"lr": float("inf")}}, "sampling.lr"),
        (EnergyLandscape, {"probe": {"outputs_fn": "logits"}}, "probe.outputs_fn"),
        (FlatnessMonitor, {"measures": "lambda_max"}, "measures"),
        (FlatnessMonitor, {"layers": {"x": []}}, "layers"),
        (FlatnessMonitor, {"layers": "net.0.*"}, "layers"),
        (TrajectoryRecorder, {"sketch_nnz": -1}, "sketch_nnz"),
        (EnergyLandscape, {"paths": {"max_paths": 1.5}}, "paths.max_paths"),
        (EnergyLandscape, {"msm": {"n_clusters": 2.5}}, "msm.n_clusters"),
        (FlatnessMonitor, {"spectrum": {"top_k": "5"}}, "spectrum.top_k"),
        (FlatnessMonitor, {"sharpness": {"rho": float("inf")}}, "sharpness.rho"),
        (LandscapeSampler, {"slices": {"span": float("inf")}}, "slices.span"),
        (EnergyLandscape, {"sampling": {"temperature": float("nan")}}, "sampling.temperature"),
        (LandscapeSampler, {"slices": {"memory_mb": -5}}, "slices.memory_mb"),
        (FlatnessMonitor, {"probe": {"seed": "a"}}, "probe.seed"),
        (TrajectoryRecorder, {"store_dir": 123}, "store_dir"),
        (EnergyLandscape, {"probe": {"size": 0}}, "probe.size"),
        (EnergyLandscape, {"sampling": {"replicas": True}}, "sampling.replicas"),
        (FlatnessMonitor, {"probe": {"loss_fn": "mse"}}, "probe.loss_fn"),
        (FlatnessMonitor, {"spectrum": {"method": "qr"}}, "spectrum.method"),
        (LandscapeSampler, {"slices": {"normalization": "l2"}}, "slices.normalization"),
        (EnergyLandscape, {"paths": {"method": "dimer"}}, "paths.method"),
        (EnergyLandscape, {"probe": {"bn_mode": "batch"}}, "probe.bn_mode"),
    ],
)
def test_bad_constructor_values_are_refused_naming_the_parameter(cls, kwargs, name):
    with pytest.raises(ValueError, match=rf"`{name}[`\[]"):
        cls(**kwargs)


def test_a_resumed_sampler_and_monitor_keep_the_initial_point_and_figure_history(tmp_path):
    def fit(epochs, callbacks, ckpt_path=None):
        pl.seed_everything(0)
        model = tiny_module_class()(batch_norm=False, dropout=0.0)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        trainer = trainer_for(tmp_path, [*callbacks, checkpoint], max_epochs=epochs, enable_checkpointing=True)
        init = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
        trainer.fit(model, loader(), ckpt_path=ckpt_path)
        return init

    settings = {"every_n_epochs": 1, "probe": {"size": 32}, "progress": False}
    sampler = LandscapeSampler(snapshot_every_n_steps=2, **settings, slices={"resolution": 3, "line_points": 3})
    monitor = FlatnessMonitor(measures=["lambda_max", "top_eigenvalues"], **settings, spectrum={"top_k": 2})
    init = fit(1, [sampler, monitor])
    resumed_sampler = LandscapeSampler(snapshot_every_n_steps=2, **settings, slices={"resolution": 3, "line_points": 3})
    resumed_monitor = FlatnessMonitor(measures=["lambda_max", "top_eigenvalues"], **settings, spectrum={"top_k": 2})
    fit(2, [resumed_sampler, resumed_monitor], ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed_sampler.snapshots[0][0] == 0 and torch.equal(resumed_sampler.snapshots[0][1], init)
    assert [s for s, _ in resumed_monitor._eigenvalues] == [6, 12]  # the figure spans both runs
    # the resumed interpolation starts where the first run's did: at the initialization, not at the resume point
    first = np.load(sampler.reporter.file("landscape", 6, ".npz"))["interp_losses"]
    resumed = np.load(resumed_sampler.reporter.file("landscape", 12, ".npz"))["interp_losses"]
    assert resumed[0] == pytest.approx(first[0], rel=1e-6) and resumed[-1] != pytest.approx(first[-1], rel=1e-3)


def test_layer_patterns_given_as_one_string_are_one_pattern():
    monitor = FlatnessMonitor(layers={"first": "net.0.*"})
    assert monitor.layers == {"first": ["net.0.*"]}


def test_a_callback_without_any_trigger_says_so():
    with pytest.warns(UserWarning, match="no trigger"):
        FlatnessMonitor(every_n_steps=None, at_fit_end=False)


def test_a_probe_set_larger_than_the_data_is_recorded_with_its_real_size(tmp_path):
    monitor = FlatnessMonitor(every_n_steps=3, progress=False, probe={"size": 1000})
    with pytest.warns(UserWarning, match="96 samples, fewer than the 1000"):
        trainer_for(tmp_path, [monitor]).fit(tiny_module_class()(), loader())
    assert monitor.probe_metadata["probe_size"] == 96


def test_no_edge_of_stability_ratio_for_adaptive_optimizers_with_one_note(tmp_path):
    monitor = FlatnessMonitor(every_n_steps=2, progress=False, probe={"size": 32})
    with pytest.warns(UserWarning, match="no `eos_ratio` for Adam") as caught:
        trainer_for(tmp_path, [monitor]).fit(tiny_module_class()("adam"), loader())
    assert len([w for w in caught if "eos_ratio" in str(w.message)]) == 1
    assert monitor.runs >= 3 and all("eos_ratio" not in h and h["lambda_max"] > 0 for h in monitor.history)


def test_other_callbacks_can_stop_or_checkpoint_on_any_of_our_measures(tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping

    monitor = FlatnessMonitor(every_n_epochs=1, at_fit_end=False, progress=False, probe={"size": 32})
    early = EarlyStopping(monitor="landscape-flatness/trace", mode="max", stopping_threshold=0.0)
    trainer = trainer_for(tmp_path, [monitor, early], max_epochs=5)
    trainer.fit(tiny_module_class()(), loader())
    assert monitor.runs == 1 and trainer.current_epoch == 1  # stopped after the first trace, which is > 0
    assert trainer.callback_metrics["landscape-flatness/trace"] == pytest.approx(monitor.history[0]["trace"])


@pytest.mark.slow
def test_a_checkpoint_can_keep_the_lowest_barrier_to_the_previous_minimum(tmp_path):
    energy = EnergyLandscape(
        every_n_epochs=1,
        at_fit_end=False,
        progress=False,
        sampling={"replicas": 2, "steps": 5},
        paths={"steps": 30},
        probe={"size": 32},
    )
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="landscape-energy/barrier_previous", mode="min")
    trainer = trainer_for(tmp_path, [energy, checkpoint], max_epochs=3, enable_checkpointing=True)
    trainer.fit(tiny_module_class()(), loader())
    barriers = [h["barrier_previous"] for h in energy.history if "barrier_previous" in h]
    assert barriers and float(checkpoint.best_model_score) == pytest.approx(min(barriers), rel=1e-5)


def test_sharded_strategies_are_refused_in_setup_and_data_parallel_ones_accepted():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import (
        DDPStrategy,
        DeepSpeedStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
        SingleDeviceStrategy,
    )

    deepspeed = object.__new__(DeepSpeedStrategy)  # its constructor needs the deepspeed package; the class is enough
    callbacks = [TrajectoryRecorder(), FlatnessMonitor(), LandscapeSampler(), EnergyLandscape()]
    for strategy in (FSDPStrategy(), deepspeed, ModelParallelStrategy()):
        for callback in callbacks:
            if isinstance(strategy, ModelParallelStrategy) and getattr(callback, "gathers_fsdp2", False):
                continue  # it gathers the parameters (FSDP2), below
            with pytest.raises(ValueError, match=rf"does not support `{type(strategy).__name__}`.*Supported.*HINT"):
                callback.setup(SimpleNamespace(strategy=strategy), tiny_module_class()(), "fit")
    from lightning_landscape.distributed import check_strategy

    for strategy in (DDPStrategy(), SingleDeviceStrategy("cpu")):
        check_strategy(strategy, "FlatnessMonitor")  # no error
    assert [c.gathers_fsdp2 for c in callbacks[1:]] == [True, True, False]  # the recorder has no such flag
    check_strategy(ModelParallelStrategy(), "FlatnessMonitor", fsdp2=True)  # no error
