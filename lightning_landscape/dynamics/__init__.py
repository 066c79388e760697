"""SGD as a dynamical system: parameter sketches, the trajectory store, trajectory PCA."""

from lightning_landscape.dynamics.pca import StreamingPCA, common_projection
from lightning_landscape.dynamics.sketch import SparseProjection
from lightning_landscape.dynamics.store import TrajectoryStore

__all__ = ["SparseProjection", "StreamingPCA", "TrajectoryStore", "common_projection"]
