"""The observer must not disturb: training with heavy analyses every step equals training without them.

Runs on both Lightning namespaces (``lightning.pytorch`` and ``pytorch_lightning``) with one callback class.
"""

import csv
import importlib
import random
import warnings

import numpy as np
import pytest
import torch

from tests.helpers import DisturbingAnalysis, loader, tiny_module_class

NAMESPACES = ["lightning.pytorch", "pytorch_lightning"]


def fit(namespace, callbacks, tmp_path, optimizer="sgd"):
    pl = importlib.import_module(namespace)
    loggers = importlib.import_module(f"{namespace}.loggers")
    pl.seed_everything(7)
    model = tiny_module_class(namespace)(optimizer)
    logger = loggers.CSVLogger(tmp_path, name="run")
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(model, train_dataloaders=loader())
    with open(f"{logger.log_dir}/metrics.csv") as fh:
        losses = [float(r["train_loss_step"]) for r in csv.DictReader(fh) if r.get("train_loss_step")]
    rng = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    return model, trainer, losses, (*rng, torch.get_num_threads(), [p.requires_grad for p in model.parameters()])


def assert_identical_runs(a, b):
    (model_a, trainer_a, losses_a, rng_a), (model_b, trainer_b, losses_b, rng_b) = a, b
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:  # weights and BatchNorm statistics, bit for bit
        assert torch.equal(state_a[key], state_b[key]), key
    opt_a, opt_b = trainer_a.optimizers[0].state_dict(), trainer_b.optimizers[0].state_dict()
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for key, state in opt_a["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b["state"][key][name])), name
    assert len(losses_a) == 12 and losses_a == losses_b  # identical logged training losses
    assert rng_a[0] == rng_b[0] and np.array_equal(rng_a[1], rng_b[1]) and torch.equal(rng_a[2], rng_b[2])
    assert rng_a[3:] == rng_b[3:]  # thread count and requires_grad flags
    assert "landscape-disturb/probe_loss" not in trainer_a.callback_metrics


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_heavy_analyses_every_step_leave_training_bit_identical(tmp_path, namespace, optimizer):
    plain = fit(namespace, [], tmp_path / "plain", optimizer)
    callback = DisturbingAnalysis()
    observed = fit(namespace, [callback], tmp_path / "observed", optimizer)
    assert_identical_runs(plain, observed)
    # it really ran: before each of the 12 optimizer steps, after each step, and at the end (deduplicated)
    assert callback.runs == 12 + 1 and callback.failures == 0
    with open(f"{observed[1].logger.log_dir}/metrics.csv") as fh:
        assert "landscape-disturb/probe_loss" in next(csv.reader(fh))


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_a_failing_analysis_warns_records_and_training_goes_on(tmp_path, namespace):
    plain = fit(namespace, [], tmp_path / "plain")
    callback = DisturbingAnalysis(fail=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        observed = fit(namespace, [callback], tmp_path / "observed")
    assert_identical_runs(plain, observed)
    assert callback.failures == 13 and callback.runs == 0
    assert any("failed at step" in str(w.message) and "exploded" in str(w.message) for w in caught)
    assert callback.reporter.run_dir.name == "disturb"
    lines = (callback.reporter.run_dir / "failures.jsonl").read_text().splitlines()
    assert len(lines) == 13 and "analysis exploded on purpose" in lines[0]
