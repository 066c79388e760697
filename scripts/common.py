"""Shared by the benchmarks: MNIST-format data of the real size, timed fits side by side, and the quickstart fit."""

from __future__ import annotations

import time
from pathlib import Path

import lightning.pytorch as pl
from torch import nn

import lightning_landscape  # noqa: F401  (first)
from lightning_landscape.examples import MLP, Classifier, GaussianMixtureClassification, MNISTDataModule


def write_synthetic_mnist(folder: str | Path) -> None:
    """60000 + 10 random 28x28 images in MNIST's real IDX files (cost does not depend on pixel values)."""
    from lightning_landscape.examples.fake_data import write_mnist

    write_mnist(Path(folder), n_train=60000, n_test=10)


def mnist_mlp(hidden: tuple[int, ...] = (256, 128)) -> Classifier:
    """The MNIST-MLP config's model (784-256-128-10, SGD lr 0.05, momentum 0.9)."""
    return Classifier(MLP(784, 10, hidden=list(hidden)), lr=0.05, momentum=0.9)


def timed_fit(data_dir: str, model: nn.Module, callbacks: list, epochs: int) -> float:
    """Seconds of ``Trainer.fit`` on the MNIST-format data (no validation, no logger, no checkpoints)."""
    pl.seed_everything(0)
    dm = MNISTDataModule(data_dir=data_dir, batch_size=128, val_size=5000)
    dm.setup("fit")  # decode the files before the clock starts (setup is idempotent)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=data_dir,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    return time.perf_counter() - start


def side_by_side(data_dir: str, make_model, make_callbacks, epochs: int, repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` seconds without and with the callbacks, interleaved so drift hits both alike."""
    plain, observed = [], []
    for _ in range(repeats):
        plain.append(timed_fit(data_dir, make_model(), [], epochs))
        observed.append(timed_fit(data_dir, make_model(), make_callbacks(), epochs))
    return min(plain), min(observed)


def fit_quickstart(callbacks: list, epochs: int, root: str, devices: int = 1, weight_decay: float = 0.0) -> pl.Trainer:
    """The quickstart model (Gaussian-mixture classifier, MLP 2-32-32-4, global batch 64; ``configs/energy.yaml``
    trains it with ``weight_decay=5e-4``) trained with ``callbacks`` (no validation, no logger, no checkpoints; DDP
    over ``devices`` CPU processes)."""
    pl.seed_everything(0)
    model = Classifier(MLP(2, 4, [32, 32]), lr=0.1, momentum=0.9, weight_decay=weight_decay)
    data = GaussianMixtureClassification(n_classes=4, separation=2.0, n_train=2048, n_val=512, batch_size=64 // devices)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        default_root_dir=root,
    )
    trainer.fit(model, datamodule=data)
    return trainer
