"""Synthetic data of the reference examples: Gaussian-mixture classification and regression.

Both are generated from ``seed`` alone (identically on every DDP rank) and need no files.

Classification: ``n_classes`` Gaussian clusters with unit-free means ``mu_k`` (on a circle of radius
``separation`` for ``dim=2``, random directions of that length otherwise) and isotropic standard
deviation ``std``; the label is the cluster. Overlapping clusters make the Bayes error non-zero.

Regression: inputs ``x ~ Uniform[-3, 3]^dim`` and targets from a mixture of ``n_components`` Gaussian
bumps, ``y = sum_k a_k exp(-|x - mu_k|^2 / (2 s_k^2)) + noise * eps``, a smooth multi-modal function.

Example::

    >>> dm = GaussianMixtureClassification(n_train=100, n_val=20)
    >>> dm.setup("fit")
    >>> x, y = next(iter(dm.train_dataloader()))
    >>> x.shape[1], int(y.max()) < dm.n_classes
    (2, True)
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset


class _SyntheticDataModule(pl.LightningDataModule):
    def __init__(self, n_train: int, n_val: int, batch_size: int, seed: int) -> None:
        super().__init__()
        for name, value in (("n_train", n_train), ("n_val", n_val), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value}.")
        self.n_train, self.n_val, self.batch_size, self.seed = n_train, n_val, batch_size, seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        self.train_set = TensorDataset(*self.sample(self.n_train, generator))
        self.val_set = TensorDataset(*self.sample(self.n_val, generator))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=max(self.batch_size, 256))


class GaussianMixtureClassification(_SyntheticDataModule):
    """Points from ``n_classes`` Gaussian clusters, labelled by cluster.

    Args:
        n_classes: number of clusters (and classes).
        dim: input dimension.
        separation: distance of each cluster mean from the origin.
        std: standard deviation of each cluster.
        n_train: training samples.
        n_val: validation samples.
        batch_size: training batch size.
        seed: seed of the data (means and samples).
    """

    def __init__(
        self,
        n_classes: int = 4,
        dim: int = 2,
        separation: float = 2.0,
        std: float = 1.0,
        n_train: int = 2048,
        n_val: int = 512,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__(n_train, n_val, batch_size, seed)
        if n_classes < 2:
            raise ValueError(f"`n_classes` must be at least 2, got {n_classes}.")
        self.n_classes, self.dim, self.std = n_classes, dim, std
        generator = torch.Generator().manual_seed(seed + 10_000)
        if dim == 2:
            angle = torch.arange(n_classes) * (2 * math.pi / n_classes)
            self.means = separation * torch.stack([angle.cos(), angle.sin()], dim=1)
        else:
            directions = torch.randn(n_classes, dim, generator=generator)
            self.means = separation * directions / directions.norm(dim=1, keepdim=True)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        labels = torch.randint(self.n_classes, (n,), generator=generator)
        x = self.means[labels] + self.std * torch.randn(n, self.dim, generator=generator)
        return x, labels


class GaussianMixtureRegression(_SyntheticDataModule):
    """Regression of a sum of ``n_components`` Gaussian bumps on ``[-3, 3]^dim``.

    Args:
        n_components: number of bumps (3-4 give a multi-modal target).
        dim: input dimension.
        noise: standard deviation of the additive target noise.
        n_train: training samples.
        n_val: validation samples.
        batch_size: training batch size.
        seed: seed of the target function and the samples.
    """

    def __init__(
        self,
        n_components: int = 4,
        dim: int = 2,
        noise: float = 0.05,
        n_train: int = 2048,
        n_val: int = 512,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__(n_train, n_val, batch_size, seed)
        if n_components < 1:
            raise ValueError(f"`n_components` must be positive, got {n_components}.")
        self.dim, self.noise = dim, noise
        generator = torch.Generator().manual_seed(seed + 10_000)
        self.centers = 4 * torch.rand(n_components, dim, generator=generator) - 2
        self.widths = 0.5 + 0.5 * torch.rand(n_components, generator=generator)
        self.amplitudes = torch.linspace(1.0, -0.5, n_components) if n_components > 1 else torch.ones(1)

    def target(self, x: Tensor) -> Tensor:
        """The noise-free target function at ``x`` of shape ``(n, dim)``."""
        sq = torch.cdist(x, self.centers) ** 2
        return (self.amplitudes * torch.exp(-sq / (2 * self.widths**2))).sum(-1)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x = 6 * torch.rand(n, self.dim, generator=generator) - 3
        return x, self.target(x) + self.noise * torch.randn(n, generator=generator)
