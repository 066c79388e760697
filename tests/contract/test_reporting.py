"""Reporting to real W&B (offline mode), to a CSV logger and to the run directory."""

import csv
import glob
import json
import os
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import plotly.graph_objects as go
import pytest
import wandb
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from matplotlib.figure import Figure

from lightning_landscape.callbacks.base import LandscapeCallback
from lightning_landscape.report import Reporter
from tests.helpers import loader, offline_wandb_records, tiny_module_class


class MediaAnalysis(LandscapeCallback):
    name = "media"

    def analyze(self, trainer, pl_module, step):
        loss = float(self.objective(trainer, pl_module).loss())
        self.reporter.scalars({"probe_loss": loss}, step)
        fig = Figure()
        fig.add_subplot().plot([0, 1], [loss, loss])
        self.reporter.figure("profile", fig, step)
        self.reporter.plotly("surface", go.Figure(go.Surface(z=np.outer(np.arange(3), np.arange(3)))), step)
        self.reporter.table("grid", ["alpha", "loss"], [[0.0, loss], [1.0, 2 * loss]], step)
        path = self.reporter.arrays("grid", step, metadata=self.probe_metadata, losses=np.ones((2, 2)))
        self.reporter.artifact("grid-arrays", path)


def test_results_reach_wandb_every_logger_and_the_run_directory(tmp_path):
    wandb_logger = WandbLogger(save_dir=str(tmp_path), project="ll-test", offline=True)
    csv_logger = CSVLogger(tmp_path, name="csv")
    callback = MediaAnalysis(every_n_steps=3, at_fit_end=True, probe={"size": 32})
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=[wandb_logger, csv_logger],
        callbacks=[callback],
        enable_progress_bar=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    trainer.fit(tiny_module_class()(), train_dataloaders=loader())
    run = wandb_logger.experiment
    keys = set(run.summary.keys())
    for key in ("probe_loss", "profile", "surface", "grid", "seconds"):
        assert f"landscape-media/{key}" in keys
    assert callback.runs == 2  # steps 3 and 6; the end of training is step 6 again and runs once
    run_id = run.id
    wandb.finish()

    offline = glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run_id}"))
    assert len(offline) == 1
    media = os.path.join(offline[0], "files", "media")
    assert glob.glob(f"{media}/images/landscape-media/profile_*.png")
    assert glob.glob(f"{media}/plotly/landscape-media/surface_*.plotly.json")
    tables = glob.glob(f"{media}/table/landscape-media/grid_*.table.json")
    assert tables and json.loads(Path(tables[0]).read_text())["columns"] == ["alpha", "loss"]
    assert b"grid-arrays" in offline_wandb_records(tmp_path, b"grid-arrays")  # the artifact was logged

    run_dir = tmp_path / "landscape" / run_id / "media"
    assert callback.reporter.run_dir == run_dir
    for name in ("profile-step0000003.png", "surface-step0000003.html", "grid-step0000003.csv"):
        assert (run_dir / name).exists()
    assert (run_dir / "profile-step0000006.png").stat().st_size > 1000
    assert (run_dir / "surface-step0000006.html").exists() and (run_dir / "plotly.min.js").exists()
    saved = np.load(run_dir / "grid-step0000006.npz")
    assert json.loads(str(saved["metadata"]))["probe_seed"] == 0 and saved["losses"].shape == (2, 2)

    with open(f"{csv_logger.log_dir}/metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    ours = [int(r["step"]) for r in rows if r.get("landscape-media/probe_loss")]
    user = {int(r["step"]) for r in rows if r.get("train_loss_step")}
    # the triggers after optimizer steps 3 and 6 sit where the user's values of those batches sit: steps 2 and 5
    assert ours == [2, 5] and set(ours) <= user


def test_figures_reach_tensorboard(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    callback = MediaAnalysis(every_n_steps=3, at_fit_end=False, probe={"size": 32})
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=logger,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(tiny_module_class()(), train_dataloaders=loader())
    logger.experiment.flush()
    events = b"".join(p.read_bytes() for p in Path(logger.log_dir).glob("events.out.tfevents.*"))
    assert events.count(b"landscape-media/profile") == 2  # one image per trigger
    assert b"\x89PNG" in events
    assert callback.reporter.run_dir == Path(logger.log_dir) / "landscape" / "media"


class _RecordingLogger:
    def __init__(self):
        self.calls = []

    def log_metrics(self, metrics, step):
        self.calls.append((metrics, step))


def test_only_global_rank_zero_writes_and_logs(tmp_path):
    logger = _RecordingLogger()
    for zero in (False, True):
        rep = Reporter(tmp_path / str(zero), [logger], is_global_zero=zero, namespace="landscape/x")
        rep.scalars({"a": 1.0}, step=0)
        rep.table("t", ["a"], [[1]], step=0)
        rep.arrays("arr", 0, a=np.zeros(2))
        rep.event("events", {"a": 1})
        fig = Figure()
        fig.add_subplot()
        rep.figure("fig", fig, 0)
    assert not (tmp_path / "False").exists()
    assert logger.calls == [({"landscape/x/a": 1.0}, 0)]
    assert sorted(p.name for p in (tmp_path / "True").iterdir()) == [
        "arr-step0000000.npz",
        "events.jsonl",
        "fig-step0000000.png",
        "t-step0000000.csv",
    ]


def test_progress_bar_only_on_rank_zero_and_when_asked(tmp_path):
    shown = Reporter(tmp_path, [], is_global_zero=True).progress(3, "landscape")
    hidden = [
        Reporter(tmp_path, [], is_global_zero=False).progress(3, "x"),
        Reporter(tmp_path, [], is_global_zero=True, progress=False).progress(3, "x"),
    ]
    assert not shown.disable and all(bar.disable for bar in hidden)
    assert shown.pos in (2, -2) and shown.leave is False  # below Lightning's bars, removed when done
    for bar in [shown, *hidden]:
        bar.close()


def test_dashboard_panels_come_from_the_declared_keys_only():
    from lightning_landscape import FlatnessMonitor
    from lightning_landscape.report.dashboard import dashboard_spec, workspace

    logged = ["landscape-flatness/lambda_max", "landscape-flatness/lambda_3", "landscape-flatness/trace/first"]
    logged += ["landscape-flatness/brand_new_measure", "train/loss", "landscape-energy/minima"]
    spec = dashboard_spec(logged)
    assert spec["undeclared"] == ["landscape-flatness/brand_new_measure"]  # logged, not declared: reported
    by_section = {s["name"]: {p["title"]: p for p in s["panels"]} for s in spec["sections"]}
    assert set(by_section) == {"landscape-flatness", "landscape-energy"}  # the user's train/loss is not ours
    assert by_section["landscape-energy"]["minima"]["kind"] == "table"
    assert set(by_section["landscape-flatness"]) == {"lambda_max", "lambda_3", "trace/first"}
    # without a run: a panel for every declared pattern, under the chosen prefix
    full = dashboard_spec(prefix="exp")
    flatness = next(s for s in full["sections"] if s["name"] == "exp-flatness")
    titles = {p["title"] for p in flatness["panels"]}
    declared = FlatnessMonitor.logged
    assert titles == (set(declared.scalars) | set(declared.media) | set(declared.tables)) - {"stability_limit"}
    assert any(p.get("regex") for p in flatness["panels"])  # lambda_[0-9]*, per-layer keys: by regular expression
    view = workspace(full, "me", "proj", run_filter="seed-.*")
    assert [s.name for s in view.sections] == [s["name"] for s in full["sections"]]
    assert view.runset_settings.query == "seed-.*"


@pytest.mark.parametrize("prefix", ["a/b", 3, "with space"])
def test_a_bad_key_prefix_is_refused_in_the_constructor(prefix):
    from lightning_landscape import FlatnessMonitor, TrajectoryRecorder

    for callback in (FlatnessMonitor, TrajectoryRecorder):
        with pytest.raises(ValueError, match="`key_prefix` must be a string of letters"):
            callback(key_prefix=prefix)
