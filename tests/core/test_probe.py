"""One probe specification: every callback takes ``probe=``, records it, and ``analyze`` rebuilds the same energy."""

import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_landscape import EnergyLandscape, FlatnessMonitor, LandscapeSampler
from lightning_landscape.analysis import AnalysisError, _probe_objective
from lightning_landscape.objective import Objective
from lightning_landscape.probe import ProbeSpec, probe_chunks
from tests.helpers import blobs, loader, tiny_module_class, trainer_for


def summed_loss(module, batch):
    """A module-level loss, importable by ``analyze``."""
    x, y = batch
    return F.cross_entropy(module(x), y, reduction="mean")


@pytest.mark.parametrize("callback", [FlatnessMonitor, LandscapeSampler, EnergyLandscape])
def test_every_callback_takes_the_same_spec_as_an_instance_or_a_dict(callback):
    given = ProbeSpec(size=64, batch_size=16, seed=3, bn_mode="train", dtype=torch.float64)
    from_dict = callback(probe={"size": 64, "batch_size": 16, "seed": 3, "bn_mode": "train", "dtype": "float64"})
    assert callback(probe=given).probe == from_dict.probe == given


def test_each_analysis_fills_in_its_own_defaults():
    assert FlatnessMonitor().probe == ProbeSpec(bn_mode="eval")  # curvature of the trained network
    assert LandscapeSampler().probe == ProbeSpec(bn_mode="eval")
    # the energy of the weights alone; its batch size is planned from memory at the start of training
    assert EnergyLandscape().probe == ProbeSpec(bn_mode="train")
    assert EnergyLandscape(probe={"size": 64, "batch_size": 8}).probe.batch_size == 8


@pytest.mark.slow
@pytest.mark.parametrize("free_mib, batch_size", [(4000, 96), (200, 6)])
def test_energy_evaluates_its_probe_set_in_one_batch_when_memory_allows(tmp_path, monkeypatch, free_mib, batch_size):
    from lightning_landscape.curvature import memory

    # a gradient's graph of 1 MiB a sample: a float64-capable HVP needs 4 x 2 x 1 MiB a sample, in a quarter of free
    monkeypatch.setattr(memory, "graph_bytes", lambda objective, batch=0: len(objective.batches[0][0]) * 2**20)
    monkeypatch.setattr(memory, "free_bytes", lambda device: free_mib * 2**20)  # 200 MiB: 6 samples a batch
    energy = EnergyLandscape(
        every_n_steps=2, at_fit_end=False, progress=False, probe={"size": 96}, sampling={"replicas": 2, "steps": 5}
    )
    trainer = trainer_for(tmp_path, [energy], max_steps=2)
    if batch_size < 96:  # 96 = 16 x 6
        with pytest.warns(UserWarning, match="in batches of 6.*HINT: set `probe.batch_size`"):
            trainer.fit(tiny_module_class()(), loader())
    else:
        trainer.fit(tiny_module_class()(), loader())
    assert energy.probe.batch_size == batch_size and energy.runs == 1
    assert [len(b[0]) for b in energy.probe_set(trainer)] == [batch_size] * (96 // batch_size)
    assert energy.probe_metadata["probe_batch_size"] == batch_size


@pytest.mark.parametrize("callback", [FlatnessMonitor, LandscapeSampler, EnergyLandscape])
def test_no_constructor_restates_the_probe_or_takes_more_than_13_arguments(callback):
    import inspect

    names = list(inspect.signature(callback).parameters)
    assert "probe" in names and len(names) <= 13, names
    restated = {"probe_size", "probe_batch_size", "probe_seed", "bn_mode", "dtype", "loss_fn", "outputs_fn"}
    assert not restated & set(names)


def test_the_spec_is_recorded_with_every_result(tmp_path):
    monitor = FlatnessMonitor(
        every_n_steps=2, at_fit_end=False, measures=["lambda_max"], progress=False,
        probe={"size": 32, "batch_size": 8, "seed": 4, "loss_fn": summed_loss},
    )  # fmt: skip
    trainer = trainer_for(tmp_path, [monitor], max_steps=2)
    trainer.fit(tiny_module_class()(), loader())
    saved = np.load(monitor.reporter.run_dir / "flatness-step0000002.npz")
    meta = json.loads(str(saved["metadata"]))
    assert meta["probe_size"] == 32 and meta["probe_batch_size"] == 8 and meta["probe_seed"] == 4
    assert meta["bn_mode"] == "eval" and meta["dtype"] == "float32" and meta["probe_batches"] is None
    assert meta["loss_fn"] == "tests.core.test_probe.summed_loss"
    assert [len(b[0]) for b in monitor.probe_set(trainer)] == [8, 8, 8, 8]


class BatchNormNet(pl.LightningModule):
    """BatchNorm in train mode: the energy depends on how the probe set is cut into batches."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def train_dataloader(self):
        return DataLoader(blobs(96), batch_size=16)


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "bn.yaml"
    path.write_text("model:\n  class_path: tests.core.test_probe.BatchNormNet\ntrainer:\n  accelerator: cpu\n")
    return path


def recorded(**fields):
    spec = ProbeSpec(size=32, seed=1, bn_mode="train", **{"batch_size": 32, **fields})
    return {**spec.metadata, "l2": 0.0}


def test_analyze_rebuilds_the_recorded_batches_dtype_and_loss(config):
    model = BatchNormNet()
    data = blobs(96)
    meta = recorded(batch_size=8, dtype=torch.float64, loss_fn=summed_loss)
    offline = _probe_objective(config, meta, sum(p.numel() for p in model.parameters()))
    chunks = probe_chunks(96, 32, 8, seed=1)
    batches = [(data.tensors[0][c], data.tensors[1][c]) for c in chunks]
    online = Objective(model, batches, summed_loss, bn_mode="train", dtype=torch.float64)
    assert offline.dtype == torch.float64 and len(offline.batches) == 4
    assert float(offline.loss()) == pytest.approx(float(online.loss()), rel=1e-12)
    drawn = [i for chunk in chunks for i in chunk]
    one_batch = Objective(model, [(data.tensors[0][drawn], data.tensors[1][drawn])], bn_mode="train")
    assert abs(float(one_batch.loss()) - float(online.loss())) > 1e-4  # what analyze computed before: another energy


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"loss_fn": lambda m, b: m(b[0]).sum()}, "cannot be imported"),
        ({"batches": [(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))]}, "not recorded"),
    ],
)
def test_analyze_refuses_an_energy_it_cannot_rebuild(config, fields, words):
    with pytest.raises(AnalysisError, match=words):
        _probe_objective(config, recorded(**fields), sum(p.numel() for p in BatchNormNet().parameters()))


def test_the_graph_memory_of_a_gradient_grows_with_the_batch_and_is_what_autograd_saves():
    from lightning_landscape.curvature.memory import graph_bytes

    net = nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 3)).double()
    data = blobs(64)

    def measured(n):
        x = torch.randn(n, 10, dtype=torch.float64)
        return graph_bytes(Objective(net, [(x, data.tensors[1][:n])], summed_loss, dtype=torch.float64))

    one, two, three = measured(8), measured(16), measured(24)
    assert one > 0 and two - one == three - two  # linear in the batch: activations, not parameters
    # per sample at least the input (10), the hidden pre- and post-activation (20 + 20) and the logits (3), in float64
    assert (two - one) / 8 >= 8 * (10 + 20 + 3)


@pytest.mark.slow
def test_energy_cuts_its_probe_set_to_what_a_trigger_affords_on_a_slow_model(tmp_path, monkeypatch):
    import time

    from lightning_landscape.curvature import memory

    def slow_graph_bytes(objective, batch=0):  # a gradient of 0.1 s a sample: 64 x 2 x 0.1 = 12.8 s a sample
        time.sleep(0.1 * len(objective.batches[0][0]))
        return 1000

    monkeypatch.setattr(memory, "graph_bytes", slow_graph_bytes)
    energy = EnergyLandscape(
        every_n_steps=2, at_fit_end=False, progress=False, probe={"size": 96}, sampling={"replicas": 2, "steps": 5}
    )
    trainer = trainer_for(tmp_path, [energy], max_steps=2)
    with pytest.warns(UserWarning, match=r"cut to 32 samples.*about \d+ s, more than the 10 s.*HINT"):
        trainer.fit(tiny_module_class()(), loader())  # at least two training batches of 16
    assert energy.probe.size == 32 and energy.probe_metadata["probe_size"] == 32 and energy.runs == 1
    assert sum(len(b[0]) for b in energy.probe_set(trainer)) == 32
