"""SGD as a dynamical system: sketches, the trajectory store, trajectory PCA, replicas, minima, Markov state
models, transition path theory, disconnectivity graphs (the building blocks of :mod:`lightning_landscape.energy`)."""

from lightning_landscape.dynamics.disconnectivity import (
    DisconnectivityTree,
    disconnectivity_figure,
    disconnectivity_tree,
)
from lightning_landscape.dynamics.excursions import Excursions, sample_basin
from lightning_landscape.dynamics.minima import MinimaDatabase, Quench, function_distance, quench
from lightning_landscape.dynamics.msm import (
    MarkovStateModel,
    clustered_msm,
    discretize,
    markov_state_model,
    metastable_count,
    metastable_summary,
    states_on_plane,
)
from lightning_landscape.dynamics.pca import StreamingPCA, common_projection
from lightning_landscape.dynamics.sketch import SparseProjection
from lightning_landscape.dynamics.store import TrajectoryStore
from lightning_landscape.dynamics.tpt import TransitionPaths, transition_paths

__all__ = [
    "DisconnectivityTree",
    "Excursions",
    "MarkovStateModel",
    "MinimaDatabase",
    "Quench",
    "SparseProjection",
    "StreamingPCA",
    "TrajectoryStore",
    "TransitionPaths",
    "clustered_msm",
    "common_projection",
    "disconnectivity_figure",
    "disconnectivity_tree",
    "discretize",
    "function_distance",
    "markov_state_model",
    "metastable_count",
    "metastable_summary",
    "quench",
    "sample_basin",
    "states_on_plane",
    "transition_paths",
]
