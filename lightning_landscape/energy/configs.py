"""The energy stages' settings: one small dataclass per stage, checked on construction, each field named
``stage.field`` in its error messages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lightning_landscape.checks import check_float, check_int


@dataclass
class SamplingConfig:
    """Basin sampling: ``replicas`` runs of ``steps`` SGD (``temperature=0``) or SGLD steps from the current point.

    Args:
        replicas: replicas per trigger.
        steps: steps per replica.
        lr: their learning rate (None: the first optimizer's current one, so ``lr/B`` is training's).
        momentum: their heavy-ball momentum (None: training's when it runs one ``torch.optim.SGD`` without
            dampening or Nesterov, else 0), so the replicas step as training does; each starts at rest.
        temperature: SGLD temperature (0: plain SGD, whose noise is the minibatch noise).
        record_every: record a replica's point every this many steps.
        pool_batches: training batches (of the training batch size) the replicas draw their minibatches from.
        seed: seed of the replicas and of the pool.
        sketch_dim: the size of the replicas' sketch (with a TrajectoryRecorder, its projection instead).
        projection_seed: the seed of that sketch.
        restarts: the fraction of replicas that start from an earlier point instead of the current one (the
            previous trigger's replica ends, and a TrajectoryRecorder's parameter snapshots of the path so far when
            one runs), the least-visited in the chain of all triggers first (:func:`restart_points`), so that the
            clouds of consecutive triggers, and of the training path, overlap and one chain connects them; 0: every
            replica starts at the current point.
        training_path: record the training path itself into the chain of all triggers: the outputs on the probe
            set every ``record_every`` optimizer steps (one forward pass of the probe set on rank 0, the observer's
            only cost between triggers). It is the chain's one trajectory that runs from the initial weights
            through every trigger's start; False: only the initial weights are recorded.
    """

    replicas: int = 8
    steps: int = 200
    lr: float | None = None
    momentum: float | None = None
    temperature: float = 0.0
    record_every: int = 5
    pool_batches: int = 16
    seed: int = 0
    sketch_dim: int = 256
    projection_seed: int = 0
    restarts: float = 0.25
    training_path: bool = True

    def __post_init__(self) -> None:
        for key, example in (("replicas", 8), ("steps", 200), ("record_every", 5), ("pool_batches", 16)):
            check_int(f"sampling.{key}", getattr(self, key), example=example)
        check_int("sampling.sketch_dim", self.sketch_dim, example=256)
        check_int("sampling.seed", self.seed, minimum=0, example=0)
        check_int("sampling.projection_seed", self.projection_seed, minimum=0, example=0)
        check_float("sampling.lr", self.lr, optional=True, hint="None uses the optimizer's lr.")
        check_float("sampling.temperature", self.temperature, strict=False, hint="0 is plain SGD, > 0 SGLD.")
        check_float("sampling.momentum", self.momentum, strict=False, optional=True, hint="None takes training's.")
        if self.momentum is not None and self.momentum >= 1:
            raise ValueError(f"`sampling.momentum` must be below 1, got {self.momentum}. HINT: e.g. 0.9, or None.")
        check_float("sampling.restarts", self.restarts, strict=False, hint="a fraction in [0, 1), e.g. 0.25.")
        if self.restarts >= 1:
            raise ValueError(f"`sampling.restarts` must be below 1, got {self.restarts}. HINT: e.g. 0.25.")
        if not isinstance(self.training_path, bool):
            raise ValueError(f"`sampling.training_path` must be True or False, got {self.training_path!r}.")
        if self.record_every > self.steps:
            raise ValueError(
                f"`sampling.record_every` ({self.record_every}) is more than `sampling.steps` ({self.steps}): each"
                " replica would record only its start and end, too few points for a chain. HINT: e.g."
                f" `record_every={max(1, self.steps // 20)}`."
            )


@dataclass
class QuenchConfig:
    """Quenches (L-BFGS on the probe set), the certificate of their minima and the function-space dedup.

    A quench stops when the gradient has fallen ``rtol``-fold or when its last 20 iterations lowered the energy by
    at most ``ftol`` (:func:`~lightning_landscape.dynamics.minima.quench`); then the point is certified
    (:func:`~lightning_landscape.dynamics.minima.certify`: its smallest Hessian eigenvalue and the descent the
    quadratic model still predicts, ``hvps`` Hessian-vector products each). A point still descending by more than
    ``ftol`` is quenched on (``rounds``, while ``max_iter`` lasts); a saddle (negative curvature along which the
    energy really drops by more than ``ftol``) is kicked along its negative direction both ways and both sides are
    quenched: their minima are stored, joined through the saddle, and the saddle is not. The default ``ftol`` is a
    tenth of the noise level (:func:`noise_level`), or of a fixed ``BasinConfig.merge_barrier``.

    On ReLU networks the certificate is conservative: their minima lie on kinks of the loss, where the gradient
    does not vanish and the quadratic model over-predicts the descent (on the digits MLP it predicted 2-4e-3 where
    2,000 float64 L-BFGS iterations lowered the points by 0.4-1.5e-4), so few or none of their minima are certified
    at the default resolution; a smooth network's are.

    Args:
        max_iter: L-BFGS iterations per quench at most (all continuations together).
        rtol: converged when the gradient norm falls to ``rtol`` times its value at the start.
        ftol: the energy resolution (loss units): the quench's plateau criterion and the certificate's bound on the
            remaining descent. None (default): a tenth of the merge level (``BasinConfig.merge_barrier``, by default
            the replicas' noise level).
        dedup_tol: relative output distance under which two minima are one (the cheap first filter).
        dtype: ``"float64"``: quench and certify in float64 whatever the objective's dtype, so that a minimum is
            located below float32's rounding (a float32 line search stalls there); ``"float32"``: in the objective's
            own dtype (half the memory traffic, for models where float64 is slow, e.g. on most GPUs); ``"auto"``
            (default): float64 where a float64 loss costs at most 3x a float32 one, measured once per objective
            (an MLP of 235k parameters on CPU: 1.8x, float64; ResNet-20: 6.0x, float32, whose energy resolution
            ``16 eps |L|`` is then about 4e-6 at a loss of 2).
        hvps: Hessian-vector products per Lanczos run of the certificate (two runs per quenched point).
        rounds: further rounds of at most 200 L-BFGS iterations (each with a certificate) for a point the
            certificate finds still descending; each costs up to 200 gradients and ``2 hvps`` products.
    """

    max_iter: int = 1000
    rtol: float = 1e-3
    ftol: float | None = None
    dedup_tol: float = 0.05
    dtype: Literal["auto", "float64", "float32"] = "auto"
    hvps: int = 20
    rounds: int = 1

    def __post_init__(self) -> None:
        check_int("quench.max_iter", self.max_iter, example=100)
        check_float("quench.rtol", self.rtol, hint="e.g. 1e-3 (the gradient falls 1000-fold).")
        check_float("quench.ftol", self.ftol, optional=True, strict=False, hint="None: a tenth of the merge level.")
        check_float("quench.dedup_tol", self.dedup_tol, hint="e.g. 0.05 (5% output distance).")
        check_int("quench.hvps", self.hvps, minimum=2, example=20)
        check_int("quench.rounds", self.rounds, minimum=0, example=1)
        if self.rtol >= 1:
            raise ValueError(f"`quench.rtol` must be below 1, got {self.rtol}. HINT: e.g. 1e-3.")
        if self.dtype not in ("auto", "float64", "float32"):
            raise ValueError(
                f"`quench.dtype` must be 'auto', 'float64' or 'float32', got {self.dtype!r}. HINT: 'auto'."
            )


@dataclass
class BasinConfig:
    """Joining minima into basins.

    Args:
        merge_barrier: minima joined by a path whose lower barrier is at most this are one basin. None (default):
            each pair's own level, the temperature of the replicas' noise along the line between them,
            ``T + lr s_d / (2 (1 - beta))`` (see the module docstring).
        neighbours: each minimum found in a call is checked against this many nearest minima (function space) of
            other basins, by a straight line first.
        max_linear: straight-line checks per call at most (``images`` forward passes each).
        max_refine: minima quenched on per call at most, when a pair's merge level is below ten times the energy
            error of a certified end, but no more than ten times below it: the end is quenched on to a tenth of the
            level, so that the barrier can be resolved.
    """

    merge_barrier: float | None = None
    neighbours: int = 3
    max_linear: int = 32
    max_refine: int = 4

    def __post_init__(self) -> None:
        check_float(
            "basins.merge_barrier",
            self.merge_barrier,
            strict=False,
            optional=True,
            hint="None: the noise along each barrier.",
        )
        check_int("basins.neighbours", self.neighbours, minimum=0, example=3)
        check_int("basins.max_linear", self.max_linear, minimum=0, example=32)
        check_int("basins.max_refine", self.max_refine, minimum=0, example=4)


@dataclass
class PathConfig:
    """Minimum-energy paths (:func:`~lightning_landscape.geometry.paths.minimum_energy_path`).

    Args:
        images: images per path (ends included).
        steps: FIRE iterations per path (and again for the climbing image).
        method: ``"string"`` or ``"neb"``.
        step_size: FIRE's first time step (None: from the curvature at the path's ends).
        max_paths: paths per trigger at most.
        ftol: converged also when 20 iterations changed no image's loss by more than this (loss units), as for
            quenches (:class:`QuenchConfig`). None (default): a tenth of the merge level.
    """

    images: int = 9
    steps: int = 200
    method: Literal["string", "neb"] = "string"
    step_size: float | None = None
    max_paths: int = 4
    ftol: float | None = None

    def __post_init__(self) -> None:
        check_int("paths.images", self.images, minimum=3, example=9)
        check_int("paths.steps", self.steps, example=200)
        check_int("paths.max_paths", self.max_paths, minimum=0, example=4)
        check_float("paths.step_size", self.step_size, optional=True, hint="None takes it from the curvature.")
        check_float("paths.ftol", self.ftol, optional=True, strict=False, hint="None: a tenth of the merge level.")
        if self.method not in ("string", "neb"):
            raise ValueError(f"`paths.method` must be 'string' or 'neb', got {self.method!r}. HINT: 'string'.")


@dataclass
class MSMConfig:
    """The Markov state model of the replicas.

    Args:
        lag: lag time in recorded points.
        n_clusters: states (default: about one per 20 recorded points, 2 to 50).
        features: ``"sketch"`` (sketch coordinates) or ``"outputs"`` (outputs on the probe set, invariant to
            permutations of hidden units).
        max_metastable: PCCA+ sets at most (the number is chosen at the largest eigenvalue gap).
        refit_seeds: the chain of all triggers is refitted with this many k-means seeds times ``refit_counts``
            state counts (``n``, ``2n``, ...), and a set or transition is reported as robust only when it survives
            every refit (:func:`chain_robustness`); 1 and 1: no refit.
        refit_counts: the state counts of those refits.
    """

    lag: int = 1
    n_clusters: int | None = None
    features: Literal["sketch", "outputs"] = "sketch"
    max_metastable: int = 4
    refit_seeds: int = 3
    refit_counts: int = 2

    def __post_init__(self) -> None:
        check_int("msm.lag", self.lag, example=1)
        check_int("msm.n_clusters", self.n_clusters, minimum=2, optional=True, example=20)
        check_int("msm.max_metastable", self.max_metastable, minimum=2, example=4)
        check_int("msm.refit_seeds", self.refit_seeds, example=3)
        check_int("msm.refit_counts", self.refit_counts, example=2)
        if self.features not in ("sketch", "outputs"):
            raise ValueError(f"`msm.features` must be 'sketch' or 'outputs', got {self.features!r}. HINT: 'sketch'.")
