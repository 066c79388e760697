"""The Lightning callbacks. Each one decides when to run the functional core, on which data and ranks."""

from lightning_landscape.callbacks.base import LandscapeCallback

__all__ = ["LandscapeCallback"]
