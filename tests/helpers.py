"""Small models, data and callbacks shared by the tests (and by the DDP scripts they spawn)."""

from __future__ import annotations

import csv
import importlib
import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape.callbacks.base import LandscapeCallback


def trainer_for(root, callbacks, **kwargs):
    """A quiet CPU Trainer with no logger or checkpoints writing under ``root`` (one epoch unless ``kwargs`` say)."""
    import lightning.pytorch as pl

    settings = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "logger": False,
        "default_root_dir": root,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(callbacks=callbacks, **{**settings, **kwargs})


def blobs(n: int = 96, dim: int = 3, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(classes, (n,), generator=g)
    x = torch.randn(n, dim, generator=g) + 2 * F.one_hot(y, max(classes, dim))[:, :dim].float()
    return TensorDataset(x, y)


def loader(n: int = 96, batch_size: int = 16, seed: int = 0, shuffle: bool = True) -> DataLoader:
    return DataLoader(blobs(n, seed=seed), batch_size=batch_size, shuffle=shuffle)


def tiny_module_class(namespace: str = "lightning.pytorch") -> type:
    """A LightningModule of the given namespace with BatchNorm, dropout and SGD with momentum."""
    base = importlib.import_module(namespace).LightningModule

    class TinyNet(base):  # type: ignore[misc, valid-type]
        def __init__(self, optimizer: str = "sgd", batch_norm: bool = True, dropout: float = 0.25) -> None:
            super().__init__()
            self.optimizer_name = optimizer
            norm = nn.BatchNorm1d(8) if batch_norm else nn.Identity()
            self.net = nn.Sequential(nn.Linear(3, 8), norm, nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss, on_step=True, on_epoch=True)
            return loss

        def configure_optimizers(self):
            if self.optimizer_name == "adam":
                return torch.optim.Adam(self.parameters(), lr=0.05)
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    return TinyNet


def sharded_module_class() -> type:
    """TinyNet with each Linear layer and the root sharded over the data-parallel ranks (FSDP2 ``fully_shard`` in
    ``configure_model``), as FSDP2 users write it; run it under :func:`fsdp2_strategy`."""

    class ShardedTinyNet(tiny_module_class()):
        def configure_model(self) -> None:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self, mesh=mesh)

    return ShardedTinyNet


def fsdp2_strategy(devices: int):
    """Lightning's ModelParallelStrategy, all ranks data parallel (what :func:`sharded_module_class` expects)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)


class DisturbingAnalysis(LandscapeCallback):
    """Runs real analyses and then does everything an analysis must not leave behind."""

    name = "disturb"

    def __init__(self, fail: bool = False, **kwargs) -> None:
        kwargs.setdefault("every_n_steps", 1)
        kwargs.setdefault("probe", {"size": 32})
        super().__init__(**kwargs)
        self.fail = fail
        self.probe_losses: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.run_now(trainer, pl_module)  # gradients exist here: they must survive

    def analyze(self, trainer, pl_module, step: int) -> None:
        objective = self.objective(trainer, pl_module)
        theta = objective.theta0
        objective.grad(theta)
        objective.hvp(theta, torch.randn_like(theta))
        objective.losses(theta + 0.1 * torch.randn(5, theta.numel()))
        self.probe_losses.append(float(objective.loss()))
        self.reporter.scalars({"probe_loss": self.probe_losses[-1]}, step)
        # now disturb everything
        x, _ = self.probe_set(trainer)[0]
        pl_module.train()(x)  # BatchNorm statistics move, dropout draws random numbers
        pl_module.eval()
        optimizer = trainer.optimizers[0]
        for p in pl_module.parameters():
            p.grad = torch.randn_like(p)
        optimizer.step()  # params and momentum/Adam state change
        optimizer.param_groups[0]["lr"] = 123.0
        with torch.no_grad():
            for p in pl_module.parameters():
                p.mul_(2.0)
        random.random(), np.random.rand(), torch.rand(3)
        next(pl_module.parameters()).requires_grad_(False)  # as a user's toggle_optimizer would
        torch.set_num_threads(1)  # as deeptime's k-means does
        if self.fail:
            raise RuntimeError("analysis exploded on purpose")


def offline_wandb_records(save_dir, marker: bytes, attempts: int = 240, path: bool = False):
    """The record log of the (finished) offline W&B run under ``save_dir``, once it contains ``marker`` (its file's
    path with ``path=True``).

    The W&B service writes the log asynchronously; wait for it (up to ``attempts`` x 0.25 s) before reading.
    """
    import glob
    import time
    from pathlib import Path

    records, files = b"", []
    for _ in range(attempts):
        files = glob.glob(str(Path(save_dir) / "wandb" / "offline-run-*" / "*.wandb"))
        records = Path(files[0]).read_bytes() if files else b""
        if marker in records:
            break
        time.sleep(0.25)
    return Path(files[0]) if path else records


def assert_dashboard_covers(logged: set[str], sections: set[str]) -> None:
    """The dashboard of a run's ``logged`` keys has a panel for each of our keys and for nothing else, in exactly
    the W&B ``sections`` that the run's callbacks log to; no key is logged that a callback does not declare."""
    from lightning_landscape.report.dashboard import dashboard_spec

    ours = {k for k in logged if k.split("/")[0] in sections}
    spec = dashboard_spec(logged)
    assert not spec["undeclared"], spec["undeclared"]
    panels = [k for s in spec["sections"] for p in s["panels"] for k in p["keys"]]
    assert sorted(panels) == sorted(ours)  # every logged key once, and only those
    assert {s["name"] for s in spec["sections"]} == sections


class RunAtTrainStart:
    """Mixin for a LandscapeCallback: also run at step 0, where every number of ranks has the same parameters."""

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self.run_now(trainer, pl_module)


def fit_one_step(
    devices: int, callbacks: list, batch_size: int = 16, module_class=None, strategy=None, **trainer_kwargs
):
    """One optimizer step of TinyNet (or ``module_class()``, made after seeding) on ``devices`` CPU processes (DDP
    when > 1, or ``strategy``), seeded: the DDP scripts' setup. ``batch_size`` is per process."""
    import lightning.pytorch as pl

    pl.seed_everything(0)
    module = (module_class or tiny_module_class())()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy or ("ddp" if devices > 1 else "auto"),
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **trainer_kwargs,
    )
    trainer.fit(module, train_dataloaders=loader(96, batch_size))
    return trainer


def finish_script(trainer, out: str, result: dict) -> None:
    """Write the result (rank 0) and close the process group (gloo aborts at exit if it is left open)."""
    import json
    from pathlib import Path

    if trainer.is_global_zero:
        Path(out).write_text(json.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


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
