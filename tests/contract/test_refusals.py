"""Values that were accepted and then failed or did nothing later are refused where they are given."""

import pytest
import torch
from torch import nn

from lightning_landscape import EnergyLandscape, FlatnessMonitor, TrajectoryRecorder
from tests.helpers import loader, tiny_module_class


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: TrajectoryRecorder(store_dir=""), "non-empty path"),
        (lambda: TrajectoryRecorder(store_dir="  "), "non-empty path"),
        (lambda: EnergyLandscape(sampling={"steps": 10, "record_every": 20}), "sampling.record_every"),
        (lambda: EnergyLandscape(msm={"lag": 1000}), "msm.lag"),
        (lambda: EnergyLandscape(sampling={"steps": 100, "record_every": 5}, msm={"lag": 11}), "msm.lag"),
        (lambda: FlatnessMonitor(layers={"": ["net.0.*"]}), "label"),
        (lambda: FlatnessMonitor(layers={"a/b": ["net.0.*"]}), "label"),
        (lambda: FlatnessMonitor(layers={"first": [""]}), "layers['first']"),
        (lambda: FlatnessMonitor(measures=["trace", "lambda_max", "trace"]), "more than once"),
    ],
)
def test_values_that_cannot_work_are_refused_in_the_constructor(make, words):
    with pytest.raises(ValueError, match="HINT") as err:
        make()
    assert words in str(err.value)


def test_the_same_values_within_range_are_accepted():
    EnergyLandscape(sampling={"steps": 100, "record_every": 5}, msm={"lag": 10})  # 21 points > 2 x 10
    FlatnessMonitor(layers={"first": "net.0.*"}, measures=["trace", "lambda_max"])


def test_a_layer_pattern_that_matches_nothing_is_refused_at_setup_naming_the_parameters():
    import lightning.pytorch as pl

    monitor = FlatnessMonitor(every_n_steps=1, layers={"first": ["network.0.*"]})
    fit = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[monitor])
    with pytest.raises(ValueError, match=r"layers\['first'\].*matches no parameter.*net\.0\.weight"):
        fit.fit(tiny_module_class()(), loader())
    assert monitor.runs == 0


class SparseEmbeddings(tiny_module_class()):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(4, 3, sparse=True)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x + self.embedding(y % 4)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("callback", [FlatnessMonitor, EnergyLandscape])
def test_sparse_gradients_are_refused_once_at_setup(callback):
    import lightning.pytorch as pl

    fit = pl.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[callback(every_n_steps=1)]
    )
    with pytest.raises(ValueError, match=r"sparse=True.*HINT: `sparse=False`"):
        fit.fit(SparseEmbeddings(), loader())
