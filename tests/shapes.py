"""LightningModules in the shapes people actually write, to run every callback over (written for these tests).

Each shape is a :class:`Shape`: the module class, its data, Trainer settings, and the arguments our callbacks need
for it (``None`` where a callback cannot work with its defaults, which must then fail before the first step).

* ``template``: the lightning-hydra-template pattern: torchmetrics ``MeanMetric`` and a top-k ``MulticlassAccuracy``
  updated in ``training_step`` and logged on step and epoch, Adam with a scheduler dict stepping every step;
* ``gan``: manual optimization with two optimizers, ``toggle_optimizer`` and ``manual_backward``;
* ``autoencoder``: ``forward`` needs flattened input, the batch holds images;
* ``transformer``: dict batches, a tiny ``nn.TransformerEncoder`` (SDPA attention) and a metric;
* ``tied weights``: a causal language model whose output head shares the embedding's Parameter, and whose one
  block sits at two depths;
* ``finetuning``: ``BaseFinetuning`` keeps a backbone frozen for the first epoch, then unfreezes it;
* ``accumulation``: gradient accumulation over 2 batches with gradient clipping;
* ``batchnorm``: a BatchNorm network, the energy landscape triggered several times.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from tests.helpers import blobs


def blob_loader(batch_size: int = 16) -> DataLoader:
    return DataLoader(blobs(96), batch_size=batch_size, shuffle=True)


class TemplateModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 4))
        self.train_loss = MeanMetric()
        self.train_acc = MulticlassAccuracy(num_classes=4, top_k=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def model_step(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits, y), logits, y

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, logits, y = self.model_step(batch)
        self.train_loss(loss)
        self.train_acc(logits, y)
        self.log("train/loss", self.train_loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.Adam(self.parameters(), lr=0.01)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.9)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


class GAN(pl.LightningModule):
    def __init__(self, latent: int = 2) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.latent = latent
        self.generator = nn.Sequential(nn.Linear(latent, 8), nn.Tanh(), nn.Linear(8, 3))
        self.discriminator = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real, _ = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(len(real), self.latent, device=real.device)
        self.toggle_optimizer(opt_g)
        g_loss = F.binary_cross_entropy_with_logits(self.discriminator(self(z)), torch.ones(len(real), 1))
        self.log("g_loss", g_loss)
        self.manual_backward(g_loss)
        opt_g.step()
        opt_g.zero_grad()
        self.untoggle_optimizer(opt_g)
        self.toggle_optimizer(opt_d)
        fake = self(z).detach()
        d_loss = F.binary_cross_entropy_with_logits(
            self.discriminator(torch.cat([real, fake])), torch.cat([torch.ones(len(real), 1), torch.zeros(len(z), 1)])
        )
        self.log("d_loss", d_loss)
        self.manual_backward(d_loss)
        opt_d.step()
        opt_d.zero_grad()
        self.untoggle_optimizer(opt_d)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.Adam(self.generator.parameters(), lr=0.01),
            torch.optim.Adam(self.discriminator.parameters(), lr=0.01),
        ]


def discriminator_loss(module: GAN, batch: Any) -> torch.Tensor:
    """What a GAN user analyzes: the discriminator's loss on real samples (deterministic, no latent draw)."""
    real, _ = batch
    return F.binary_cross_entropy_with_logits(module.discriminator(real), torch.ones(len(real), 1))


class AutoEncoder(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, 4), nn.ReLU())
        self.decoder = nn.Linear(4, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # flat input: the batch holds 1x4x4 images
        return self.decoder(self.encoder(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, _ = batch
        x = x.view(x.size(0), -1)
        loss = F.mse_loss(self(x), x)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def image_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.rand(96, 1, 4, 4, generator=g), torch.zeros(96)), batch_size=16)


class TokenDataset(Dataset):
    """Dict samples: ``input_ids`` (a sequence of 6 tokens) and ``labels`` (whether token 1 occurs)."""

    def __init__(self, n: int = 96) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 10, (n, 6), generator=g)
        self.labels = (self.ids == 1).any(1).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class TextClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        layer = nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(16, 2)
        self.train_acc = MulticlassAccuracy(num_classes=2)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(input_ids)).mean(1))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        logits = self(batch["input_ids"])
        loss = F.cross_entropy(logits, batch["labels"])
        self.train_acc(logits, batch["labels"])
        self.log_dict({"train_loss": loss, "train_acc": self.train_acc}, on_step=True, on_epoch=True)
        return {"loss": loss}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.01)


class TiedLanguageModel(pl.LightningModule):
    """Next-token prediction with the output head tied to the embedding (``head.weight = embed.weight``, as GPT-2
    and most language models tie them: one Parameter held by two modules) and one block shared by two depths
    (``nn.ModuleList([block] * 2)``, universal-transformer style: one module at two paths)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        block = nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.blocks = nn.ModuleList([block] * 2)
        self.head = nn.Linear(16, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(input_ids.shape[1])
        h = self.embed(input_ids)
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.head(h)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids = batch["input_ids"]
        logits = self(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.01)


class FinetunedNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(3, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(filter(lambda p: p.requires_grad, self.parameters()), lr=0.1, momentum=0.9)


class UnfreezeBackbone(BaseFinetuning):
    """Keeps the backbone frozen for the first epoch, then trains it with the head."""

    def __init__(self, at_epoch: int = 1) -> None:
        super().__init__()
        self.at_epoch = at_epoch

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        self.freeze(pl_module.backbone)

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        if epoch == self.at_epoch:
            self.unfreeze_and_add_param_group(pl_module.backbone, optimizer, lr=0.05)


class BatchNormNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


@dataclass
class Shape:
    """A module shape and how to run our callbacks on it."""

    module: type[pl.LightningModule]
    loader: Callable[[], DataLoader] = blob_loader
    trainer: dict[str, Any] = field(default_factory=dict)
    callbacks: Callable[[], list[pl.Callback]] = list  # the user's own callbacks
    loss_fn: Callable[..., torch.Tensor] | None = None
    outputs_fn: Callable[..., torch.Tensor] | None = None


SHAPES = {
    "template": Shape(TemplateModule),
    "gan": Shape(GAN, loss_fn=discriminator_loss, outputs_fn=lambda m, b: m.discriminator(b[0])),
    "autoencoder": Shape(AutoEncoder, loader=image_loader, outputs_fn=lambda m, b: m(b[0].flatten(1))),
    "transformer": Shape(TextClassifier, loader=lambda: DataLoader(TokenDataset(), batch_size=16, shuffle=True)),
    "tied weights": Shape(TiedLanguageModel, loader=lambda: DataLoader(TokenDataset(), batch_size=16, shuffle=True)),
    "finetuning": Shape(FinetunedNet, callbacks=lambda: [UnfreezeBackbone(at_epoch=1)]),
    "accumulation": Shape(TemplateModule, trainer={"accumulate_grad_batches": 2, "gradient_clip_val": 0.5}),
    "batchnorm": Shape(BatchNormNet),
}
