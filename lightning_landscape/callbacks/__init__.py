"""The Lightning callbacks. Each one decides when to run the functional core, on which data and ranks."""

from lightning_landscape.callbacks.base import LandscapeCallback, ObserverCallback
from lightning_landscape.callbacks.energy import EnergyLandscape
from lightning_landscape.callbacks.flatness import MEASURES as FLATNESS_MEASURES
from lightning_landscape.callbacks.flatness import FlatnessMonitor, SharpnessConfig, SpectrumConfig
from lightning_landscape.callbacks.sampler import LandscapeSampler, SliceConfig
from lightning_landscape.callbacks.trajectory import TrajectoryRecorder
from lightning_landscape.report.logged import Logged


def declarations() -> list[tuple[str, Logged]]:
    """``(section, what it logs)`` of each callback, in the dashboard's order."""
    return [(cb.section, cb.logged) for cb in (TrajectoryRecorder, FlatnessMonitor, LandscapeSampler, EnergyLandscape)]


__all__ = [
    "FLATNESS_MEASURES",
    "EnergyLandscape",
    "FlatnessMonitor",
    "LandscapeCallback",
    "LandscapeSampler",
    "ObserverCallback",
    "SharpnessConfig",
    "SliceConfig",
    "SpectrumConfig",
    "TrajectoryRecorder",
    "declarations",
]
