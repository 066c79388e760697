"""LightningModules of the reference examples: a classifier (cross-entropy) and a regressor (MSE).

Both wrap any ``nn.Module`` network (see :mod:`lightning_landscape.examples.networks`) and train it with
SGD (optionally heavy-ball momentum, weight decay) or Adam at a constant learning rate, which keeps
the effective SGD temperature ``lr / B`` a known constant.

Example::

    >>> from lightning_landscape.examples import MLP
    >>> model = Classifier(MLP(2, 4, hidden=[16]), lr=0.05)
    >>> model.configure_optimizers().defaults["lr"]
    0.05
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _Task(pl.LightningModule):
    def __init__(
        self,
        network: nn.Module,
        lr: float = 0.1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        optimizer: Literal["sgd", "adam"] = "sgd",
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"`lr` must be positive, got {lr}.")
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"`optimizer` must be 'sgd' or 'adam', got {optimizer!r}.")
        self.save_hyperparameters(ignore=["network"])
        self.hparams["network"] = type(network).__name__
        self.network = network

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        if hp.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)

    def _metrics(self, batch: Any) -> dict[str, Tensor]:
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        metrics = self._metrics(batch)
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, prog_bar=True, on_step=True, on_epoch=True)
        return metrics["loss"]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log_dict({f"val/{k}": v for k, v in self._metrics(batch).items()}, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log_dict({f"test/{k}": v for k, v in self._metrics(batch).items()})


class Classifier(_Task):
    """Cross-entropy classification; logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``.

    Args:
        network: maps a batch of inputs to logits.
        lr: learning rate (constant).
        momentum: heavy-ball momentum of SGD.
        weight_decay: L2 penalty coefficient.
        optimizer: ``"sgd"`` or ``"adam"``.
    """

    def _metrics(self, batch: Any) -> dict[str, Tensor]:
        x, y = batch
        logits = self(x)
        return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(-1) == y).float().mean()}


class Regressor(_Task):
    """Mean-squared-error regression; logs ``train/loss`` and ``val/loss``. Arguments as :class:`Classifier`."""

    def _metrics(self, batch: Any) -> dict[str, Tensor]:
        x, y = batch
        return {"loss": F.mse_loss(self(x).reshape(y.shape), y)}
