"""Real data without a download: scikit-learn's bundled handwritten digits (1,797 images of 8x8 pixels, 10 classes;
UCI's optical recognition of handwritten digits, test set), which deeptime's scikit-learn dependency installs.

The images are flattened to 64 features and scaled to ``[0, 1]`` (pixel values are 0..16), split once with
``seed`` into ``n_val`` validation images and the rest for training (the same on every DDP rank).

Example::

    >>> dm = DigitsDataModule(n_val=297, batch_size=50)
    >>> dm.setup("fit")
    >>> x, y = next(iter(dm.train_dataloader()))
    >>> tuple(x.shape), len(dm.train_set), int(y.max()) <= 9
    ((50, 64), 1500, True)
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class DigitsDataModule(pl.LightningDataModule):
    """The digits of ``sklearn.datasets.load_digits`` as a LightningDataModule.

    Args:
        n_val: validation images (the rest, of 1,797, train).
        batch_size: training batch size.
        seed: seed of the train/validation split.
    """

    def __init__(self, n_val: int = 297, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        if not 0 < n_val < 1797 or batch_size < 1:
            raise ValueError(f"`n_val` must be in (0, 1797) and `batch_size` >= 1, got {n_val} and {batch_size}.")
        self.n_val, self.batch_size, self.seed = n_val, batch_size, seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0
        y = torch.as_tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        val, train = order[: self.n_val], order[self.n_val :]
        self.train_set, self.val_set = TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=max(self.batch_size, 256))
