"""Parameter-space geometry: directions, slices, interpolation, non-convexity, minimum-energy paths."""

from lightning_landscape.geometry.directions import pca_directions, random_direction
from lightning_landscape.geometry.paths import PathResult, minimum_energy_path
from lightning_landscape.geometry.slices import (
    Interpolation,
    barrier,
    evaluate_slice,
    interpolate,
    nonconvexity_map,
    plane_coordinates,
)

__all__ = [
    "Interpolation",
    "PathResult",
    "barrier",
    "evaluate_slice",
    "interpolate",
    "minimum_energy_path",
    "nonconvexity_map",
    "pca_directions",
    "plane_coordinates",
    "random_direction",
]
