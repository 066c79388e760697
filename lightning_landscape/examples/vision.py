"""MNIST and CIFAR-10 data modules, read through torchvision's datasets from a ``data_dir``.

torchvision is an optional dependency (``pip install lightning-landscape[vision]``). The images are
decoded once into normalized float tensors, so an epoch costs no PIL work; CIFAR-10 augmentation
(4-pixel padded random crop and horizontal flip, He et al. 2016) is applied per sample on tensors.

Expected files (the datasets' own on-disk formats):

* MNIST: ``<data_dir>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (uncompressed IDX files);
* CIFAR-10: ``<data_dir>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` (the python
  pickle version). Checksums are verified unless ``verify_checksums=False``.

With network access ``download=True`` fetches them; without, a missing file raises a
``FileNotFoundError`` that says where to put it.

Example::

    dm = MNISTDataModule(data_dir="data", batch_size=128)       # data/MNIST/raw/...
    dm = CIFAR10DataModule(data_dir="data", augment=True)       # data/cifar-10-batches-py/...
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _torchvision_datasets() -> Any:
    try:
        from torchvision import datasets
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The MNIST and CIFAR-10 examples read data through torchvision."
            " HINT: pip install 'lightning-landscape[vision]' (or torchvision matching your torch)."
        ) from err
    return datasets


class _CropFlip(Dataset):
    """Random 4-pixel-padded crop and horizontal flip of image tensors (C, H, W)."""

    def __init__(self, images: Tensor, labels: Tensor, pad: int = 4) -> None:
        self.images, self.labels, self.pad = images, labels, pad

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.images[i]
        h, w = x.shape[-2:]
        padded = torch.nn.functional.pad(x, (self.pad,) * 4)
        top, left = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
        x = padded[:, top : top + h, left : left + w]
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.labels[i]


class _VisionDataModule(pl.LightningDataModule):
    name = ""
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        val_size: int = 5000,
        train_subset: int | None = None,
        download: bool = False,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size}.")
        if val_size < 0:
            raise ValueError(f"`val_size` must be >= 0, got {val_size}.")
        self.data_dir, self.batch_size, self.val_size = os.fspath(data_dir), batch_size, val_size
        self.train_subset, self.download, self.num_workers, self.seed = train_subset, download, num_workers, seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    # subclasses: read (images uint8 N x H x W [x C], labels) from torchvision
    def read(self, train: bool) -> tuple[np.ndarray | Tensor, Any]:
        raise NotImplementedError

    def missing_hint(self) -> str:
        raise NotImplementedError

    def _load(self, train: bool) -> tuple[Tensor, Tensor]:
        try:
            images, labels = self.read(train)
        except RuntimeError as err:
            if "not found" not in str(err).lower() and "corrupted" not in str(err).lower():
                raise
            raise FileNotFoundError(
                f"{self.name} not found under data_dir={self.data_dir!r} ({err})."
                f" HINT: {self.missing_hint()} Or set `download: true` on a machine with network access."
            ) from err
        x = torch.as_tensor(np.asarray(images)).float().div_(255)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        mean, std = torch.tensor(self.mean).view(1, -1, 1, 1), torch.tensor(self.std).view(1, -1, 1, 1)
        return ((x - mean) / std).contiguous(), torch.as_tensor(np.asarray(labels), dtype=torch.long)

    def wrap_train(self, images: Tensor, labels: Tensor) -> Dataset:
        return TensorDataset(images, labels)

    def prepare_data(self) -> None:
        if self.download:
            self.read(True)
            self.read(False)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            images, labels = self._load(train=True)
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
            if self.val_size >= len(labels):
                raise ValueError(f"`val_size` ({self.val_size}) must be smaller than the training set ({len(labels)}).")
            val, train = order[: self.val_size], order[self.val_size :]
            if self.train_subset is not None:
                train = train[: self.train_subset]
            self.train_set = self.wrap_train(images[train], labels[train])
            self.val_set = TensorDataset(images[val], labels[val])
        if stage in (None, "test") and self.test_set is None:
            self.test_set = TensorDataset(*self._load(train=False))

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


class MNISTDataModule(_VisionDataModule):
    """MNIST digits (1 x 28 x 28, normalized), a seeded validation split of the training set.

    Args:
        data_dir: folder that holds ``MNIST/raw``.
        batch_size: batch size of all loaders.
        val_size: samples of the training set held out for validation.
        train_subset: keep only this many training samples (quick runs).
        download: download the files if missing (needs network).
        num_workers: dataloader workers.
        seed: seed of the validation split.
    """

    name = "MNIST"
    mean, std = MNIST_MEAN, MNIST_STD

    def read(self, train: bool) -> tuple[Tensor, Tensor]:
        ds = _torchvision_datasets().MNIST(self.data_dir, train=train, download=self.download)
        return ds.data, ds.targets

    def missing_hint(self) -> str:
        raw = os.path.join(self.data_dir, "MNIST", "raw")
        return (
            f"Put the four uncompressed IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte,"
            f" t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte in {raw!r}."
        )


class CIFAR10DataModule(_VisionDataModule):
    """CIFAR-10 (3 x 32 x 32, normalized), with optional crop-and-flip augmentation of the training set.

    Args:
        data_dir: folder that holds ``cifar-10-batches-py``.
        augment: random 4-pixel padded crops and horizontal flips during training.
        verify_checksums: check the files' MD5 sums (turn off only for hand-made subsets).
        batch_size, val_size, train_subset, download, num_workers, seed: as in :class:`MNISTDataModule`.
    """

    name = "CIFAR-10"
    mean, std = CIFAR10_MEAN, CIFAR10_STD

    def __init__(self, *args: Any, augment: bool = True, verify_checksums: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.augment, self.verify_checksums = augment, verify_checksums

    def read(self, train: bool) -> tuple[np.ndarray, list[int]]:
        cifar = _torchvision_datasets().CIFAR10
        if not self.verify_checksums:
            cifar = type(  # torchvision checks only that a file exists when its md5 is None
                "CIFAR10Unverified",
                (cifar,),
                {
                    "train_list": [(f, None) for f, _ in cifar.train_list],
                    "test_list": [(f, None) for f, _ in cifar.test_list],
                    "meta": {**cifar.meta, "md5": None},
                },
            )
        ds = cifar(self.data_dir, train=train, download=self.download)
        return ds.data, ds.targets

    def missing_hint(self) -> str:
        folder = os.path.join(self.data_dir, "cifar-10-batches-py")
        return (
            f"Extract cifar-10-python.tar.gz so that {folder!r} holds data_batch_1 ... data_batch_5,"
            " test_batch and batches.meta."
        )

    def wrap_train(self, images: Tensor, labels: Tensor) -> Dataset:
        return _CropFlip(images, labels) if self.augment else TensorDataset(images, labels)
