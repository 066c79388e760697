"""lightning-landscape: energy-landscape studies of neural networks as drop-in Lightning callbacks."""

from lightning_landscape import _compat  # noqa: F401  (first: makes torchvision importable on CPU torch)
from lightning_landscape.budget import Budget
from lightning_landscape.callbacks import (
    EnergyLandscape,
    FlatnessMonitor,
    LandscapeCallback,
    LandscapeSampler,
    TrajectoryRecorder,
)
from lightning_landscape.dynamics import TrajectoryStore
from lightning_landscape.guard import preserve_state
from lightning_landscape.objective import Objective
from lightning_landscape.params import ParameterLayout
from lightning_landscape.probe import ProbeSpec

__all__ = [
    "Budget",
    "EnergyLandscape",
    "FlatnessMonitor",
    "LandscapeCallback",
    "LandscapeSampler",
    "Objective",
    "ParameterLayout",
    "ProbeSpec",
    "TrajectoryRecorder",
    "TrajectoryStore",
    "preserve_state",
]
__version__ = "0.1.0"
