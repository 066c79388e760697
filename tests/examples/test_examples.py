"""The reference examples: data modules, networks, and every config through the CLI."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lightning_landscape.cli import main
from lightning_landscape.examples import (
    CIFAR10DataModule,
    GaussianMixtureClassification,
    GaussianMixtureRegression,
    MNISTDataModule,
    cifar_resnet,
)
from lightning_landscape.examples.fake_data import write_cifar10, write_mnist
from lightning_landscape.report.dashboard import run_keys
from tests.helpers import assert_dashboard_covers, offline_wandb_records

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_gaussian_data_is_seeded_and_shaped():
    a, b = GaussianMixtureClassification(seed=3), GaussianMixtureClassification(seed=3)
    a.setup("fit"), b.setup("fit")
    assert torch.equal(a.train_set.tensors[0], b.train_set.tensors[0])
    x, y = a.train_set.tensors
    assert x.shape == (2048, 2) and set(y.tolist()) == {0, 1, 2, 3}
    # each class is centred on its mean
    for k in range(4):
        assert torch.allclose(x[y == k].mean(0), a.means[k], atol=0.2)
    reg = GaussianMixtureRegression(noise=0.0, n_train=50)
    reg.setup("fit")
    xr, yr = reg.train_set.tensors
    torch.testing.assert_close(yr, reg.target(xr))


def test_mnist_reads_real_idx_files(tmp_path):
    write_mnist(tmp_path, n_train=60, n_test=20)
    dm = MNISTDataModule(data_dir=str(tmp_path), batch_size=8, val_size=10)
    dm.setup("fit"), dm.setup("test")
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32
    assert len(dm.train_set) == 50 and len(dm.val_set) == 10 and len(dm.test_set) == 20
    assert abs(float(dm.train_set.tensors[0].mean()) - (127.5 / 255 - 0.1307) / 0.3081) < 0.05


def test_cifar10_reads_real_pickle_batches(tmp_path):
    write_cifar10(tmp_path, n_per_batch=12)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), batch_size=4, val_size=10, verify_checksums=False)
    dm.setup("fit")
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and len(dm.train_set) == 50 and len(dm.val_set) == 10
    with pytest.raises(FileNotFoundError, match=r"not found.*corrupted"):  # the real checksums do not match
        CIFAR10DataModule(data_dir=str(tmp_path)).setup("fit")


@pytest.mark.parametrize("module", [MNISTDataModule, CIFAR10DataModule])
def test_missing_data_names_the_folder_and_the_fix(tmp_path, module):
    with pytest.raises(FileNotFoundError, match=r"not found under data_dir=.*HINT: .*(MNIST.raw|cifar-10-batches-py)"):
        module(data_dir=str(tmp_path / "nowhere")).setup("fit")


@pytest.mark.parametrize("skip", [True, False])
def test_cifar_resnet_depths_and_skip_switch(skip):
    net = cifar_resnet(depth=20, skip_connections=skip)
    assert len(net.blocks) == 9 and all(b.skip is skip for b in net.blocks)
    assert len(cifar_resnet(depth=56).blocks) == 27
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="6n \\+ 2"):
        cifar_resnet(depth=21)


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_runs_end_to_end_with_its_callbacks_on_fake_data(config, tmp_path):
    # the config as written, for 2 steps on fake data of the right shape; each callback once, at the end of the
    # fit, on a 16-sample probe set with a 1 s budget floor (what is cut is logged): every analysis of the
    # config runs, so that a config cannot rot
    import yaml

    write_mnist(tmp_path, n_train=40, n_test=10)
    write_cifar10(tmp_path, n_per_batch=8)
    settings = yaml.safe_load(config.read_text())
    for callback in settings["trainer"].get("callbacks", []):
        args = callback.setdefault("init_args", {})
        if not callback["class_path"].endswith("TrajectoryRecorder"):
            args.update(every_n_steps=None, every_n_epochs=None, at_fit_end=True, progress=False)
            args["probe"] = {**args.get("probe", {}), "size": 16}
            args["budget"] = {"share": 0.05, "floor": 1.0}
    patched = tmp_path / config.name
    patched.write_text(yaml.safe_dump(settings))
    args = ["fit", "--config", str(patched), "--trainer.max_steps=2", f"--trainer.default_root_dir={tmp_path}"]
    args += ["--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar=false"]
    args += ["--trainer.accelerator=cpu", "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0"]
    if "mnist" in config.stem or "cifar" in config.stem:
        args += [f"--data.data_dir={tmp_path}", "--data.val_size=8", "--data.batch_size=4"]
    if "cifar" in config.stem:
        args += ["--data.verify_checksums=false"]
    main(args)
    # no analysis failed (a stage that has too few points on 2 steps, e.g. the chain, is recorded with its stage)
    records = [json.loads(line) for path in tmp_path.rglob("failures.jsonl") for line in path.open()]
    assert all("stage" in r for r in records), records
    written = {p.parent.name for p in tmp_path.rglob("*.npz")}
    sections = {"flatness", "slices", "energy", "trajectory"} & {
        name for c in settings["trainer"].get("callbacks", []) for name in SECTIONS[c["class_path"].rsplit(".", 1)[1]]
    }
    assert sections <= written | {p.name for p in tmp_path.rglob("*") if p.is_dir()}, written


SECTIONS = {
    "TrajectoryRecorder": ["trajectory"],
    "FlatnessMonitor": ["flatness"],
    "LandscapeSampler": ["slices"],
    "EnergyLandscape": ["energy"],
}


def test_unknown_config_keys_are_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--model.init_args.learning_rate=0.1"])
    assert exit_info.value.code != 0
    assert "learning_rate" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--trainer.max_epochs", "abc"], 'Parser key "trainer.max_epochs"'),  # refused by the parser
        (  # accepted by the types, refused by the callback's constructor
            ["--trainer.callbacks+=lightning_landscape.FlatnessMonitor", "--trainer.callbacks.spectrum.top_k=0"],
            "`spectrum.top_k` must be an integer >= 1, got 0. HINT",
        ),
    ],
)
def test_a_bad_value_is_one_line_without_traceback(capsys, override, expected):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), *override])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "lightning-landscape" in line]
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in lines[0]
    assert not any("not recommended to provide both" in str(w.message) for w in caught)


@pytest.mark.slow
def test_quickstart_command_trains_and_logs_offline(tmp_path):
    """The README's main job, as a user runs it (a short version: 2 epochs)."""
    # a fresh user shell: no W&B mode, and not the W&B service that an earlier test in this process started
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_SERVICE")}
    env["HOME"] = str(tmp_path)  # no netrc: no W&B login
    env.pop("WANDB_API_KEY", None)
    cmd = [sys.executable, "-m", "lightning_landscape.cli", "fit", "--config", str(ROOT / "configs/quickstart.yaml")]
    cmd += ["--trainer.max_epochs=2", "--trainer.enable_progress_bar=false"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "offline mode" in proc.stderr
    runs = list((tmp_path / "runs" / "quickstart" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = offline_wandb_records(tmp_path / "runs" / "quickstart", b"val/acc")  # the offline run's record log
    assert b"val/acc" in records and b"train/loss_epoch" in records
    # one W&B section per analysis, nothing under the user's keys; the dashboard has a panel for each of our keys
    logged = run_keys(runs[0])
    assert {"val/acc", "train/loss_epoch"} <= logged
    sections = {"landscape-trajectory", "landscape-flatness", "landscape-slices"}
    assert_dashboard_covers(logged, sections)
    assert {k.split("/")[0] for k in logged} - sections <= {"train", "val", "epoch", "trainer"}
    out = tmp_path / "dashboard.json"
    spec = main(
        ["dashboard", "--entity", "me", "--project", "p", "--from-run", str(runs[0]), "--offline", "--out", str(out)]
    )
    assert json.loads(out.read_text()) == spec
    flatness = next(s for s in spec["sections"] if s["name"] == "landscape-flatness")
    assert {
        "kind": "line",
        "title": "lambda_max",
        "keys": [f"landscape-flatness/{k}" for k in ("lambda_max", "stability_limit")],
    } in flatness["panels"]


def test_no_wandb_message_for_a_run_without_a_wandb_logger(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    args = ["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--trainer.fast_dev_run=1"]
    args += ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}"]
    args += [f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"]
    main(args)
    assert "W&B" not in capsys.readouterr().err
