"""Local curvature of the loss landscape from Hessian-vector products (functional core, pure PyTorch).

One estimator per module: :mod:`.eigenvalues` (ARPACK / Lanczos / power iteration), :mod:`.trace`
(Hutchinson, Hutch++), :mod:`.slq` (spectral density), :mod:`.sharpness` (epsilon, adaptive, SAM,
PAC-Bayes), :mod:`.noise` (gradient noise, SGD temperature, edge of stability); :mod:`.memory` says what they
hold and caps the Lanczos basis. Every estimator takes an
:class:`~lightning_landscape.Objective` (or a :class:`~lightning_landscape.distributed.ShardedObjective`).
"""

from lightning_landscape.curvature.eigenvalues import EigenResult, hessian_eigenvalues
from lightning_landscape.curvature.memory import check_vectors, free_bytes, vectors_that_fit
from lightning_landscape.curvature.noise import (
    GradientNoise,
    edge_of_stability_ratio,
    gradient_moments,
    gradient_noise,
    gradient_norm,
    stability_limit,
    two_batch_noise,
)
from lightning_landscape.curvature.operator import HessianOperator, parameter_indices
from lightning_landscape.curvature.sharpness import (
    SharpnessResult,
    adaptive_sharpness,
    epsilon_sharpness,
    pac_bayes_sigma,
    sam_sharpness,
)
from lightning_landscape.curvature.slq import SpectralDensity, spectral_density
from lightning_landscape.curvature.trace import TraceResult, hessian_trace

__all__ = [
    "EigenResult",
    "GradientNoise",
    "HessianOperator",
    "SharpnessResult",
    "SpectralDensity",
    "TraceResult",
    "adaptive_sharpness",
    "check_vectors",
    "edge_of_stability_ratio",
    "epsilon_sharpness",
    "free_bytes",
    "gradient_moments",
    "gradient_noise",
    "gradient_norm",
    "hessian_eigenvalues",
    "hessian_trace",
    "pac_bayes_sigma",
    "parameter_indices",
    "sam_sharpness",
    "spectral_density",
    "stability_limit",
    "two_batch_noise",
    "vectors_that_fit",
]
