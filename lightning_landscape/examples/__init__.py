"""The reference examples: Gaussian-mixture regression and classification, MNIST, CIFAR-10 ResNets, and the real
handwritten digits bundled with scikit-learn.

Each is a LightningModule (:class:`Classifier`, :class:`Regressor` around a network) plus a
LightningDataModule; ``configs/`` holds one LightningCLI config per example.
"""

from lightning_landscape.examples.digits import DigitsDataModule
from lightning_landscape.examples.gaussian import GaussianMixtureClassification, GaussianMixtureRegression
from lightning_landscape.examples.networks import MLP, CifarResNet, SmallCNN, cifar_resnet
from lightning_landscape.examples.tasks import Classifier, Regressor
from lightning_landscape.examples.vision import CIFAR10DataModule, MNISTDataModule

__all__ = [
    "MLP",
    "CIFAR10DataModule",
    "CifarResNet",
    "Classifier",
    "DigitsDataModule",
    "GaussianMixtureClassification",
    "GaussianMixtureRegression",
    "MNISTDataModule",
    "Regressor",
    "SmallCNN",
    "cifar_resnet",
]
