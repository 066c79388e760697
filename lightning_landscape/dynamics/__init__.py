"""SGD as a dynamical system: sketches, the trajectory store, trajectory PCA, basin sampling, minima,
Markov state models, transition path theory, disconnectivity graphs."""

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
from lightning_landscape.dynamics.pipeline import (
    BasinConfig,
    BasinsResult,
    Budget,
    CrossingNoise,
    MSMConfig,
    PathConfig,
    QuenchConfig,
    SamplingConfig,
    basins_of,
    join_basins,
    markov_model,
    noise_level,
    quench_point,
    transition_between,
)
from lightning_landscape.dynamics.sketch import SparseProjection
from lightning_landscape.dynamics.store import TrajectoryStore
from lightning_landscape.dynamics.tpt import TransitionPaths, transition_paths

__all__ = [
    "BasinConfig",
    "BasinsResult",
    "Budget",
    "CrossingNoise",
    "DisconnectivityTree",
    "Excursions",
    "MSMConfig",
    "MarkovStateModel",
    "MinimaDatabase",
    "PathConfig",
    "Quench",
    "QuenchConfig",
    "SamplingConfig",
    "SparseProjection",
    "StreamingPCA",
    "TrajectoryStore",
    "TransitionPaths",
    "basins_of",
    "clustered_msm",
    "common_projection",
    "disconnectivity_figure",
    "disconnectivity_tree",
    "discretize",
    "function_distance",
    "join_basins",
    "markov_model",
    "markov_state_model",
    "metastable_count",
    "metastable_summary",
    "noise_level",
    "quench",
    "quench_point",
    "sample_basin",
    "states_on_plane",
    "transition_between",
    "transition_paths",
]
