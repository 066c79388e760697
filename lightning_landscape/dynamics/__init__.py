"""SGD as a dynamical system: sketches, the trajectory store, trajectory PCA, Markov state models,
disconnectivity graphs."""

from lightning_landscape.dynamics.disconnectivity import (
    DisconnectivityTree,
    disconnectivity_figure,
    disconnectivity_tree,
)
from lightning_landscape.dynamics.msm import MarkovStateModel, discretize, markov_state_model
from lightning_landscape.dynamics.pca import StreamingPCA, common_projection
from lightning_landscape.dynamics.sketch import SparseProjection
from lightning_landscape.dynamics.store import TrajectoryStore

__all__ = [
    "DisconnectivityTree",
    "MarkovStateModel",
    "SparseProjection",
    "StreamingPCA",
    "TrajectoryStore",
    "common_projection",
    "disconnectivity_figure",
    "disconnectivity_tree",
    "discretize",
    "markov_state_model",
]
