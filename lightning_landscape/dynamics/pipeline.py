"""The energy-landscape pipeline, one function per stage, each configured by one small dataclass.

    sample (SamplingConfig) -> quench (QuenchConfig) -> join into basins (BasinConfig, PathConfig)
    -> Markov state model (MSMConfig)

:class:`~lightning_landscape.EnergyLandscape` runs these stages at every trigger (scheduling them, splitting them
over DDP ranks and keeping to its :class:`Budget`); ``lightning-landscape analyze`` runs the joining and the
Markov model on recorded runs. The science lives here, so both give the same numbers.

**The merge level: the noise along each barrier.** Two quenched minima are one basin when a path joins them whose
lower barrier is at most their merge level (:meth:`MinimaDatabase.basins`). By default (``merge_barrier=None``)
that level is the temperature of the replicas' noise *along the line between the two minima*,

    T_d = T + lr s_d / (2 (1 - beta)),    s_d = Var_B(g_B . d),    d = (theta_j - theta_i) / |theta_j - theta_i|,

with ``T`` the SGLD temperature, ``beta`` the replicas' heavy-ball momentum (0 for plain SGD) and ``s_d`` the
variance of the minibatch gradient projected on ``d`` (:class:`CrossingNoise`, measured on the pool of batches at
the current point). Why: SGD at step ``lr`` is, to first order, the Langevin process
``d theta = -grad L dt + sqrt(lr Sigma_B) dW`` (Li, Tai & E 2017); along ``d`` its stationary density is
``exp(-L / T_d)`` with ``T_d = lr s_d / 2``, and it crosses a barrier ``dE`` along ``d`` at the Arrhenius rate
``~ exp(-dE / T_d)``; heavy-ball momentum runs as SGD at ``lr / (1 - beta)``, and SGLD's own noise adds ``T``.
So a barrier below ``T_d`` is crossed as fast as the replicas relax, and one far above it is not crossed, however
large the noise in other directions: the noise summed over all directions (the noise level below) once merged
minima whose barrier was 1,300 times the noise along it. Assumptions: the noise at the minima is the noise at the
current point, and the crossing runs along the straight line (a curved path's tangent at its saddle may see
other noise). Pass ``BasinConfig(merge_barrier=...)`` for one fixed level for every pair.

**The noise level** ``T + lr tr(Sigma_B) / (4 (1 - beta))`` (:func:`noise_level`) is the mean excess loss that
SGD's noise holds it at above a minimum: for a quadratic basin ``H`` with noise covariance ``Sigma_B`` the
stationary covariance ``C`` of SGD at step ``lr`` solves ``HC + CH = lr Sigma_B`` (Mandt, Hoffman & Blei 2017), so
``E[L - L_min] = tr(HC) / 2 = lr tr(Sigma_B) / 4``. It is the scale of the energies the replicas explore, and a
tenth of it is the default energy resolution of quenches and paths.

**Joining.** A straight line between two minima bounds their saddle from above, at the cost of ``images``
forward passes: when its lower barrier is already below ``merge_barrier``, the two minima are one basin without a
minimum-energy path (recorded with ``method="linear"``). Only pairs that the line cannot join get a
minimum-energy path (FIRE, :func:`~lightning_landscape.geometry.paths.minimum_energy_path`), up to
``PathConfig.max_paths`` per call.

Example (the double well ``(x^2 - 1)^2``, barrier 1: two basins at ``merge_barrier=0.5``, one at 2)::

    >>> import tempfile, torch
    >>> from lightning_landscape import Objective
    >>> well = Objective(torch.nn.Linear(1, 1, bias=False).double(), [torch.zeros(1)],
    ...     loss_fn=lambda m, _: (m.weight[0, 0] ** 2 - 1) ** 2, dtype=torch.float64,
    ...     outputs_fn=lambda m, _: m.weight.reshape(1, 1))
    >>> db = MinimaDatabase(tempfile.mkdtemp())
    >>> for x in (-0.9, 0.8, 1.1):
    ...     _ = add_minimum(db, quench_point(well, torch.tensor([x], dtype=torch.float64), QuenchConfig()), step=0)
    >>> len(db), join_basins(db, well, [0, 1], 0.5, PathConfig(images=9))[0].n_basins
    (2, 2)
    >>> join_basins(db, well, [0, 1], 2.0, PathConfig(images=9))[0].n_basins
    1
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from lightning_landscape.budget import Budget, time_up
from lightning_landscape.checks import check_float, check_int
from lightning_landscape.dynamics.excursions import Excursions, sample_basin
from lightning_landscape.dynamics.minima import Certificate, MinimaDatabase, certify, quench
from lightning_landscape.dynamics.msm import (
    MarkovStateModel,
    clustered_msm,
    default_clusters,
    metastable_summary,
    set_labels,
    states_on_plane,
)
from lightning_landscape.dynamics.sketch import SparseProjection
from lightning_landscape.dynamics.tpt import TransitionPaths, transition_paths
from lightning_landscape.geometry.paths import PathResult, dips, minimum_energy_path


# ----------------------------------------------------------------------------------------------- configs
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


# ----------------------------------------------------------------------------------------------- 1. sample
def sample(
    pool: Any,
    theta: Tensor,
    config: SamplingConfig,
    lr: float,
    *,
    replicas: list[int] | None = None,
    seed_offset: int = 0,
    sketch: SparseProjection | None = None,
    probe: Any = None,
    starts: Tensor | None = None,
    momentum: float = 0.0,
) -> Excursions:
    """Replicas ``replicas`` (default: all of ``config.replicas``) from ``theta`` on the minibatch pool ``pool``, seeded
    ``config.seed + seed_offset`` (e.g. the step, so that triggers differ), with probe outputs when ``probe``;
    ``starts`` ``(config.replicas, P)``: a start per replica id instead (:func:`restart_points`); ``lr`` and
    ``momentum``: the step rule (``config``'s, resolved against training's)."""
    ids = list(range(config.replicas)) if replicas is None else replicas
    return sample_basin(
        pool,
        theta if starts is None else starts[ids].to(theta),
        ids,
        config.steps,
        lr,
        config.temperature,
        seed=config.seed + seed_offset,
        sketch=sketch,
        record_every=config.record_every,
        probe=probe,
        momentum=momentum,
    )


@dataclass
class CrossingNoise:
    """The replicas' noise per direction (see the module docstring): the centred minibatch gradients of the pool at
    one point, and the step rule. ``B x P`` floats on the host.

    Example (minibatch gradients that differ only along ``y``: no noise along ``x``)::

        >>> import torch
        >>> noise = CrossingNoise(torch.tensor([[0.0, 1.0], [0.0, -1.0]]), lr=0.1, temperature=0.0)
        >>> noise.along(torch.tensor([1.0, 0.0])), noise.along(torch.tensor([0.0, 1.0])), noise.level
        (0.0, 0.1, 0.05)
    """

    grads: Tensor
    lr: float
    temperature: float
    momentum: float = 0.0

    @classmethod
    def measure(cls, pool: Any, theta: Tensor, lr: float, temperature: float, momentum: float = 0.0) -> CrossingNoise:
        """The gradients of every batch of ``pool`` at ``theta`` (one gradient pass per batch), centred."""
        if len(pool.batches) < 2:
            return cls(torch.zeros(0, pool.numel), lr, float(temperature), momentum)
        grads = []
        for b in range(len(pool.batches)):  # fewer batches (at least 2) once the analysis' budget is spent
            if len(grads) >= 2 and time_up():
                break
            grads.append(pool.loss_and_grad(theta, batch=b)[1])
        grads = torch.stack(grads)
        return cls((grads - grads.mean(0)).double().cpu(), lr, float(temperature), momentum)

    def _spread(self, squares: Tensor) -> float:
        return float(squares.sum()) / (len(self.grads) - 1) if len(self.grads) > 1 else 0.0

    @property
    def level(self) -> float:
        """``T + lr tr(Sigma_B) / (4 (1 - beta))``: the noise level (the unbiased spread over the batches)."""
        return self.temperature + self.lr * self._spread(self.grads**2) / (4 * (1 - self.momentum))

    def along(self, direction: Tensor) -> float:
        """``T + lr s_d / (2 (1 - beta))`` along the unit vector ``direction``."""
        d = direction.detach().cpu().to(self.grads.dtype)
        return self.temperature + self.lr * self._spread((self.grads @ d) ** 2) / (2 * (1 - self.momentum))

    def between(self, a: Tensor, b: Tensor) -> float:
        """The temperature along the straight line from ``a`` to ``b`` (``T`` where they coincide)."""
        d = (b - a).detach().double().cpu()
        return self.along(d / d.norm()) if float(d.norm()) > 0 else self.temperature


def noise_level(pool: Any, theta: Tensor, lr: float, temperature: float, momentum: float = 0.0) -> float:
    """``T + lr tr(Sigma_B) / (4 (1 - momentum))``, the replicas' noise level in loss units (see the module
    docstring); ``tr(Sigma_B)`` from the gradients of the pool's batches at ``theta`` (unbiased over batches)."""
    return CrossingNoise.measure(pool, theta, lr, temperature, momentum).level


def merge_level(merge_barrier: float | None, noise: CrossingNoise | None, a: Tensor, b: Tensor) -> float:
    """The merge level of the pair ``a``, ``b``: ``merge_barrier`` when fixed, else the noise along the line between
    them (``noise.between``), else 0."""
    if merge_barrier is not None:
        return float(merge_barrier)
    return noise.between(a, b) if noise is not None else 0.0


# ----------------------------------------------------------------------------------------------- 2. quench
@dataclass
class Minimum:
    """A quenched point: where it ended, its loss, how well it converged, its certificate and its outputs on the
    probe set. A saddle carries the minima its two kicked sides were quenched to (``kicked``)."""

    theta: np.ndarray
    loss: float
    grad_norm: float
    grad_ratio: float
    converged: bool
    n_grad: int
    outputs: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    loss_drop: float = float("nan")  # how far the quench lowered the loss
    criterion: str = ""  # "gradient", "energy" or "" (not converged)
    certificate: Certificate | None = None
    kicked: list[Minimum] = field(default_factory=list)
    earlier_hvps: int = 0  # Hessian-vector products of the certificates before the last one (continued quenches)

    @property
    def certified(self) -> bool:
        return self.certificate is not None and self.certificate.certified

    @property
    def n_hvp(self) -> int:
        """Hessian-vector products of its certificates (the kicked sides' included)."""
        own = self.certificate.n_hvp if self.certificate is not None else 0
        return own + self.earlier_hvps + sum(k.n_hvp for k in self.kicked)

    @property
    def n_grad_total(self) -> int:
        """Gradients of its quenches (the kicked sides' included)."""
        return self.n_grad + sum(k.n_grad_total for k in self.kicked)


def energy_resolution(ftol: float | None, level: float) -> float:
    """The energy resolution of quenches and paths: ``ftol`` when given, else a tenth of the merge level ``level``
    (see :class:`QuenchConfig`)."""
    return ftol if ftol is not None else level / 10


#: the parameter vectors a certified quench holds: L-BFGS' 10 pairs and a Lanczos basis of 12 for its certificate
QUENCH_VECTORS = 34


def quench_objective(objective: Any, dtype: str = "auto") -> Any:
    """The objective quenches and certificates run on (see :attr:`QuenchConfig.dtype`): ``objective`` itself or its
    float64 twin; for ``"auto"``, the twin when a float64 quench (:data:`QUENCH_VECTORS` vectors) fits in memory and
    its loss costs at most 3x the objective's own, timed once (the decision is kept on the objective)."""
    from lightning_landscape.curvature.memory import vectors_that_fit

    if dtype == "float32" or objective.dtype == torch.float64:
        return objective
    if dtype == "auto" and vectors_that_fit(objective.numel, torch.float64, objective.device) < QUENCH_VECTORS:
        return objective
    twin = objective.in_dtype(torch.float64)
    if dtype == "float64":
        return twin
    affordable = objective.__dict__.get("_float64_affordable")
    if affordable is None:
        seconds = []
        for candidate in (objective, twin):  # a loss each (the forward's ratio is the gradient's)
            theta = candidate.theta0
            start = time.perf_counter()
            candidate.loss(theta)
            seconds.append(time.perf_counter() - start)
        affordable = objective.__dict__["_float64_affordable"] = seconds[1] <= 3 * seconds[0]
    return twin if affordable else objective


def quench_point(
    objective: Any,
    theta: Tensor,
    config: QuenchConfig,
    level: float = 0.0,
    kicks: int = 1,
    max_step: float | None = None,
    **info: Any,
) -> Minimum:
    """Quench ``theta`` on ``objective`` to the :func:`energy_resolution` for the merge level ``level`` and certify
    the end (see :class:`QuenchConfig`): quenched on while the certificate finds it still descending and
    ``config.max_iter`` lasts; a saddle is kicked both ways along its negative direction (``kicks`` levels deep)
    and both sides quenched, with L-BFGS steps of at most twice the kick (``max_step``), so that each side
    descends into the basin on its side of the saddle, into :attr:`Minimum.kicked`."""
    target = quench_objective(objective, config.dtype)
    start = theta.detach().to(device=target.device, dtype=target.dtype)
    loss0, g0 = target.loss_and_grad(start)
    # no finer than the rounding of the loss in the objective's own dtype (float32 for a network: its training loss)
    floor = 16 * float(torch.finfo(objective.dtype).eps) * abs(float(loss0))
    ftol = max(energy_resolution(config.ftol, level), floor)
    # a start that is already stationary (a saddle, exactly) is certified as it is: L-BFGS's first step, of length 1
    # along whatever direction the rounding gives the gradient, would carry it into one of its basins at random
    stationary = float(g0.norm()) * max(float(start.norm()), 1.0) <= 1e-9 * max(abs(float(loss0)), 1e-12)
    iterations = 0 if stationary else config.max_iter
    q = quench(target, start, max_iter=iterations, rtol=config.rtol, ftol=ftol, max_step=max_step)
    used = q.n_grad
    certificate = certify(target, q.theta, ftol, steps=config.hvps)
    # still descending by more than ftol: on, in `config.rounds` rounds of at most 200 iterations without the plateau
    # criterion (a slow descent lowers less than ftol per 20 iterations and can still have more than ftol to go),
    # each ended by a certificate, while max_iter lasts and the loss still falls
    earlier_hvps = 0
    for _ in range(config.rounds):
        if certificate.kind != "uncertified" or used + 25 > config.max_iter:
            break
        before, earlier_hvps = q.loss, earlier_hvps + certificate.n_hvp
        rounds = min(config.max_iter - used, 200)
        q = quench(target, q.theta, max_iter=rounds, rtol=config.rtol, ftol=0.0, max_step=max_step)
        used += q.n_grad
        certificate = certify(target, q.theta, ftol, steps=config.hvps)
        if before - q.loss <= floor:  # nothing lowered: the model's remaining descent is not there to be had
            break
    kicked = []
    if certificate.kind == "saddle":
        # along the negative direction, far enough that the quadratic model drops 10 resolutions (or 1e-6 |lambda|);
        # a saddle only when the energy there really is lower by more than the resolution, on one side at least
        lam = abs(certificate.lambda_min)
        size = (2 * max(10 * ftol, 1e-6 * lam) / lam) ** 0.5
        sides = [q.theta + sign * size * certificate.direction.to(q.theta) for sign in (1.0, -1.0)]
        descends = float(target.losses(torch.stack(sides)).min()) < q.loss - ftol
        if descends and kicks > 0:
            kicked = [quench_point(objective, side, config, level, kicks - 1, 2 * size, **info) for side in sides]
            descends = any(k.loss < q.loss - ftol for k in kicked)
        if not descends:
            # negative curvature that lowers nothing at this resolution (the smooth part of a ReLU kink, a valley
            # floor's rounding): judged by the remaining descent alone
            kind = "minimum" if certificate.energy_error <= ftol else "uncertified"
            certificate, kicked = replace(certificate, kind=kind, direction=None), []
    outputs = objective.outputs(q.theta.to(objective.dtype)).reshape(-1).double().cpu().numpy()
    return Minimum(
        q.theta.double().cpu().numpy(),
        q.loss,
        q.grad_norm,
        q.grad_ratio,
        q.converged,
        used,
        outputs,
        info,
        loss_drop=float(loss0) - q.loss,
        criterion=q.criterion,
        certificate=certificate,
        kicked=kicked,
        earlier_hvps=earlier_hvps,
    )


def add_minimum(db: MinimaDatabase, point: Minimum, **info: Any) -> tuple[int, int]:
    """``point`` into the database (deduplicated in function space) with its certificate: ``(id, new minima)``.
    A saddle is not stored: the minima of its kicked sides are, joined through it (``method="saddle"``: its loss
    bounds the saddle between them from above), and the id is the lower one's.

    Raises:
        ValueError: if its loss, parameters or outputs are not finite (for a saddle: those of all its sides).
    """
    if point.kicked:
        added, rejected = [], None
        for side in point.kicked:
            try:
                added.append(add_minimum(db, side, **{**point.info, **info}))
            except ValueError as err:
                rejected = err
        if not added:
            raise rejected or ValueError("a saddle without minima")
        ids = sorted({i for i, _ in added})
        if len(ids) == 2:
            _set_saddle(db, ids[0], ids[1], point.loss, method="saddle", converged=True, **info)
        return min(ids, key=lambda i: db.records[i]["loss"]), sum(n for _, n in added)
    i, new = db.add(point.theta, point.loss, point.outputs, **{**certificate_fields(point), **point.info, **info})
    return i, int(new)


def certificate_fields(point: Minimum) -> dict[str, Any]:
    """What the database stores of a quenched point's convergence and certificate."""
    cert = point.certificate
    return {
        "grad_norm": point.grad_norm,
        "grad_ratio": point.grad_ratio,
        "quench_converged": point.converged,
        "quench_criterion": point.criterion,
        "certified": point.certified if cert is not None else None,
        "kind": cert.kind if cert is not None else "",
        "lambda_min": cert.lambda_min if cert is not None else float("nan"),
        "energy_error": cert.energy_error if cert is not None else float("nan"),
        "resolution": cert.resolution if cert is not None else float("nan"),
    }


# ----------------------------------------------------------------------------------------------- 3. basins, paths
def record_path(db: MinimaDatabase, i: int, j: int, path: PathResult, **info: Any) -> float:
    """The saddle of ``path`` between minima ``i`` and ``j`` into the database, with both barriers, its
    convergence and cost; returns the saddle loss. The highest point counts the ends too: an end that is not
    quite a minimum can be the highest point."""
    info = dict(
        method=path.method,
        length=path.length,
        converged=path.converged,
        criterion=path.criterion,
        force_ratio=path.force_ratio,
        **info,
    )
    return _set_saddle(db, i, j, float(path.losses.max()), n_grad=path.n_grad, **info)


def _set_saddle(db: MinimaDatabase, i: int, j: int, highest: float, **info: Any) -> float:
    """Record the saddle of a path between ``i`` and ``j`` whose highest inner point is ``highest``: the highest
    point counts the ends too, and both barriers are stored. Returns the saddle loss."""
    li, lj = db.records[i]["loss"], db.records[j]["loss"]
    saddle = max(highest, li, lj)
    db.set_saddle(i, j, saddle, barrier_ij=saddle - li, barrier_ji=saddle - lj, **info)
    return saddle


BARRIER_COLUMNS = [
    "i",
    "j",
    "saddle",
    "barrier_ij",
    "barrier_ji",
    "method",
    "converged",
    "criterion",
    "force_ratio",
    "length",
    "n_grad",
    "step",
]


def barrier_rows(db: MinimaDatabase) -> list[list[Any]]:
    """The database's saddles as table rows (:data:`BARRIER_COLUMNS`): both barriers, ``barrier_ij`` out of
    minimum ``i`` and ``barrier_ji`` out of ``j``, how the path was found and whether it converged (an unconverged
    path's saddle is an upper bound)."""
    losses = db.losses
    rows = []
    for (i, j), s in sorted(db.saddles.items()):
        rows.append(
            [
                i,
                j,
                s["saddle"],
                s.get("barrier_ij", s["saddle"] - losses[i]),
                s.get("barrier_ji", s["saddle"] - losses[j]),
                s.get("method", ""),
                bool(s.get("converged", False)),
                s.get("criterion", ""),
                s.get("force_ratio", np.nan),
                s.get("length", np.nan),
                s.get("n_grad", 0),
                s.get("step", -1),
            ]
        )
    return rows


def linear_saddle(objective: Any, a: Tensor, b: Tensor, images: int) -> float:
    """The highest loss on the straight line from ``a`` to ``b`` (``images`` points, ends included): an upper
    bound of the saddle between them."""
    ts = torch.linspace(0, 1, images, dtype=a.dtype, device=a.device).unsqueeze(1)
    return float(objective.losses(a + ts * (b - a)).max())


def minimum_path(objective: Any, a: Tensor, b: Tensor, config: PathConfig, level: float = 0.0) -> PathResult:
    """The minimum-energy path between ``a`` and ``b`` with ``config``'s settings, resolved to ``config.ftol``
    (default: a tenth of the merge level ``level``)."""
    return minimum_energy_path(
        objective,
        a,
        b,
        config.images,
        config.method,
        step_size=config.step_size,
        n_steps=config.steps,
        quench_steps=0,
        ftol=energy_resolution(config.ftol, level),
    )


@dataclass
class Joining:
    """What :func:`plan_joins` decided: pairs joined by a straight line, pairs that need a minimum-energy path."""

    linear: list[tuple[int, int]]
    paths: list[tuple[int, int]]
    linear_checks: int = 0
    levels: dict[tuple[int, int], float] = field(default_factory=dict)  # the merge level of every pair looked at
    refined: list[int] = field(default_factory=list)  # minima quenched on to resolve a pair's barrier


def _candidate_pairs(
    db: MinimaDatabase, labels: np.ndarray, found: list[int], neighbours: int
) -> list[tuple[int, int]]:
    """Pairs to join, most informative first: each found minimum with its nearest minima of other basins, then the
    minimum spanning tree's edges without a saddle (so that every minimum is joined to the graph)."""
    pairs: list[tuple[int, int]] = []
    distances = db.distance_matrix() if len(db) > 1 else np.zeros((len(db), len(db)))
    for i in dict.fromkeys(found):
        others = [j for j in np.argsort(distances[i]).tolist() if labels[j] != labels[i]]
        pairs += [(min(i, j), max(i, j)) for j in others[:neighbours]]
    pairs += db.missing_tree_edges()
    return [p for p in dict.fromkeys(pairs) if p not in db.saddles]


def plan_joins(
    db: MinimaDatabase,
    objective: Any,
    found: list[int],
    merge_barrier: float | None,
    basins: BasinConfig,
    paths: PathConfig,
    first: list[tuple[int, int]] = (),
    noise: CrossingNoise | None = None,
    quench: QuenchConfig | None = None,
    **info: Any,
) -> Joining:
    """Join what a straight line joins (recorded in ``db``, with ``info``, e.g. ``step``) and plan minimum-energy
    paths for the rest: ``first`` (e.g. the current minimum and the previous trigger's), then the found minima's
    nearest neighbours in other basins, then the spanning tree's gaps; at most ``paths.max_paths`` paths, never two
    in one basin. Each pair's merge level is ``merge_barrier``, or when None the noise along it (:func:`merge_level`),
    stored with its saddle (``merge_level``). With ``quench``, an end whose energy error exceeds a tenth of the
    pair's level is first quenched on to that resolution (:func:`refine_minimum`, ``basins.max_refine`` per call),
    so that the barrier can be told from the error of its ends."""
    db.merge_barrier = merge_barrier
    labels = db.basins()
    linear, planned, checks, levels, refined = [], [], 0, {}, set()
    for i, j in [*first, *_candidate_pairs(db, labels, found, basins.neighbours)]:
        if (i, j) in db.saddles or (i, j) in planned or (labels[i] == labels[j] and (i, j) not in first):
            continue
        a, b = (torch.from_numpy(db.theta(k)).to(device=objective.device, dtype=objective.dtype) for k in (i, j))
        level = levels[(i, j)] = merge_level(merge_barrier, noise, a, b)
        for k in (i, j):
            # a certified minimum whose error is above a tenth of the pair's level, but within reach of it (a
            # network's kinks can hold the certificate's error far above a level of 1e-6: no use quenching on)
            error = db.records[k].get("energy_error") or 0.0
            reach = level > 0 and level / 10 < error <= 10 * level and db.certified[k]
            if quench is not None and reach and k not in refined and len(refined) < basins.max_refine:
                refined.add(k)
                refine_minimum(db, objective, k, quench, level / 10)
        if refined & {i, j}:
            a, b = (torch.from_numpy(db.theta(k)).to(device=objective.device, dtype=objective.dtype) for k in (i, j))
        if checks < basins.max_linear:
            checks += 1
            highest = linear_saddle(objective, a, b, paths.images)
            if highest - max(db.records[i]["loss"], db.records[j]["loss"]) <= level:
                _set_saddle(db, i, j, highest, method="linear", converged=False, merge_level=level, **info)
                linear.append((i, j))
                labels = db.basins()
                continue
        if len(planned) < paths.max_paths:
            planned.append((i, j))
    return Joining(linear, planned, checks, levels, sorted(refined))


def refine_minimum(db: MinimaDatabase, objective: Any, k: int, config: QuenchConfig, resolution: float) -> bool:
    """Quench stored minimum ``k`` on, to the energy ``resolution`` (no kicks), and store the result in its place
    (:meth:`MinimaDatabase.relocate`) when it is no higher; returns whether it was stored. It stays certified at the
    resolution it was certified at when the finer one is not reached."""
    start = torch.from_numpy(db.theta(k)).to(device=objective.device, dtype=objective.dtype)
    point = quench_point(objective, start, replace(config, ftol=resolution), kicks=0)
    record = db.records[k]
    if not (np.isfinite(point.loss) and point.loss <= record["loss"]):
        return False
    fields = certificate_fields(point)
    if not point.certified and record.get("certified") and point.certificate.kind != "saddle":
        coarser = record.get("resolution") or float("inf")
        fields.update(certified=point.certificate.energy_error <= coarser, resolution=coarser)
    db.relocate(k, point.theta, point.loss, point.outputs, **fields, refined_to=resolution)
    return True


@dataclass
class BasinsResult:
    """The basins after joining: labels per minimum, one row per basin, the basin saddle matrix."""

    labels: np.ndarray
    rows: list[dict[str, Any]]
    saddles: np.ndarray
    merge_barrier: float  # the fixed merge level, NaN when each pair merges at the noise along it

    @property
    def n_basins(self) -> int:
        """The basins with a certified minimum (a point not known to be a minimum is its own row, not a basin)."""
        return sum(bool(row.get("certified", True)) for row in self.rows)

    @property
    def n_uncertified(self) -> int:
        """Rows of uncertified points alone."""
        return len(self.rows) - self.n_basins


def basins_of(db: MinimaDatabase, merge_barrier: float | None = None) -> BasinsResult:
    """The database's basins at ``merge_barrier`` (default: the stored one, None: each saddle's ``merge_level``);
    stores that level."""
    if merge_barrier is not None:
        db.merge_barrier = float(merge_barrier)
        db.save()
    labels = db.basins()
    fixed = float(db.merge_barrier) if db.merge_barrier is not None else float("nan")
    return BasinsResult(labels, db.basin_summary(labels), db.basin_saddles(labels), fixed)


def join_basins(
    db: MinimaDatabase,
    objective: Any,
    found: list[int],
    merge_barrier: float | None,
    paths: PathConfig,
    basins: BasinConfig | None = None,
    noise: CrossingNoise | None = None,
    quench: QuenchConfig | None = None,
    **info: Any,
) -> tuple[BasinsResult, Joining, list[tuple[int, int, PathResult]]]:
    """The whole joining stage in one process: :func:`plan_joins`, the planned paths (:func:`minimum_path`,
    :func:`record_path`), and the resulting basins. Pairs merge at ``merge_barrier``, or when None at the noise
    along them (``noise``); paths are resolved to a tenth of ``merge_barrier`` or of the noise level. ``info`` is
    stored with every path (e.g. ``step``). Returns ``(basins, the plan, the computed paths)``."""
    plan = plan_joins(db, objective, found, merge_barrier, basins or BasinConfig(), paths, (), noise, quench, **info)
    resolution_level = merge_barrier if merge_barrier is not None else noise.level if noise is not None else 0.0
    computed = []
    for i, j in plan.paths:
        a, b = (torch.from_numpy(db.theta(k)).to(device=objective.device, dtype=objective.dtype) for k in (i, j))
        computed.append((i, j, minimum_path(objective, a, b, paths, resolution_level)))
        record_path(db, i, j, computed[-1][2], merge_level=plan.levels[(i, j)], **info)
    return basins_of(db, merge_barrier), plan, computed


# ----------------------------------------------------------------------------------------------- 4. Markov model
@dataclass
class MarkovModel:
    """A fitted MSM with its metastable sets (per-set means of the given values) and its states on the PCA plane."""

    msm: MarkovStateModel
    dtrajs: list[np.ndarray]
    sets: list[dict[str, float]]
    plane: tuple[np.ndarray, np.ndarray, float]


def markov_model(
    features: list[np.ndarray],
    config: MSMConfig,
    values: dict[str, list[np.ndarray]],
    seed: int = 0,
    plane_points: list[np.ndarray] | None = None,
) -> MarkovModel | None:
    """k-means on ``features`` (one ``(n_t, d)`` array per trajectory), a reversible MSM at ``config.lag``, PCCA+
    sets with the mean of each of ``values`` (one array per trajectory), and the states on the PCA plane of
    ``plane_points`` (default: the features). None while there are too few points."""
    fitted = clustered_msm(features, config.lag, config.n_clusters, config.max_metastable, seed)
    if fitted is None:
        return None
    msm, dtrajs = fitted
    sets = metastable_summary(msm, dtrajs, values)
    return MarkovModel(msm, dtrajs, sets, states_on_plane(plane_points or features, dtrajs, msm.active_set))


def transition_between(
    model: MarkovModel, first: tuple[int, int], last: tuple[int, int], step: float = 1.0, core: float = 0.9
) -> TransitionPaths | str:
    """Transition path theory of the MSM from the metastable set holding point ``first`` (``(trajectory, index)``,
    e.g. the training path's first point) to the set holding point ``last`` (e.g. the current point): committors,
    rate, mean first-passage time (``step``: steps per lag) and the dominant pathways
    (:func:`~lightning_landscape.dynamics.tpt.transition_paths`). A string saying why when there is no such
    transition (one metastable set, a point outside the largest connected set, both points in one set).

    The source and target are the sets' *cores*, the states whose PCCA+ membership in the set is at least
    ``core`` (the most certain state when none is): states on the barrier between two sets belong to neither, so
    recrossings of the boundary do not count as transitions (core-set MSMs; Buchete & Hummer 2008).

    Why 0.9: a rate between two regions is only defined, and only estimable from points recorded one lag apart,
    when the regions are separated by a transition region wider than a lag's displacement. Cores that reach into
    that region (membership >= 0.75: a third of all states on the three-hole potential) have a reference rate
    twice the sampled one, because a continuous path recrosses between such cores many times within a lag; a
    single-state core is too small to be found again within a lag (rate 35-60% low, counted directly from the
    recorded points as well as from the MSM). At 0.9, with 50 and 100 k-means states, the TPT rate at lag 1 is
    within 12% of the fine-grid reference between the same regions and the upper channel's share of the flux within
    10% (``tests/test_tpt.py``, 3 seeds)."""
    msm = model.msm
    if msm.metastable_assignment is None:
        return "the chain has a single metastable set"
    index = {int(s): k for k, s in enumerate(msm.active_set)}
    a, b = (index.get(int(model.dtrajs[t][i])) for t, i in (first, last))
    if a is None or b is None:
        return "the initial or the current point lies outside the chain's largest connected set"
    start, end = int(msm.metastable_assignment[a]), int(msm.metastable_assignment[b])
    if start == end:
        return f"the initial and the current point are in one metastable set ({start})"
    members = msm.metastable_memberships
    if members is None:  # no fuzzy memberships: the whole sets
        source, target = (np.flatnonzero(msm.metastable_assignment == k) for k in (start, end))
    else:
        source, target = (np.flatnonzero(members[:, k] >= min(core, members[:, k].max())) for k in (start, end))
    found = transition_paths(msm.transition_matrix, source, target, msm.stationary_distribution, step=step)
    found.sets = (start, end)  # a core taken as the most certain state may be assigned to another set
    return found


def transition_summary(model: MarkovModel, found: TransitionPaths) -> dict[str, Any]:
    """What a transition says at the level of metastable sets: ``source_set``, ``target_set``, ``rate_per_step``,
    ``mfpt_steps``, ``set_flux`` (the net reactive flux between sets: the states' net flux summed over set
    boundaries, which keeps flux conservation), ``pathways`` (that network decomposed into set sequences by
    the largest bottleneck, as the state pathways are: ``{"sets", "share"}``, largest first, shares of the total
    flux), ``positions`` (each set's mean position on the MSM's plane, weighted by stationary probability and PCCA+
    membership), ``populations`` and
    ``set_losses`` (each set's mean loss), for reports and the path atlas
    (:func:`~lightning_landscape.report.plots.path_atlas_figure`)."""
    from deeptime.markov.tools.flux.api import pathways
    from scipy.sparse import csr_matrix

    msm = model.msm
    assignment = msm.metastable_assignment
    memberships = msm.metastable_memberships
    n_sets = memberships.shape[1] if memberships is not None else int(assignment.max()) + 1  # a set may own no state
    flux = np.zeros((n_sets, n_sets))
    for i, j in zip(*np.nonzero(found.net_flux), strict=True):
        if assignment[i] != assignment[j]:
            flux[assignment[i], assignment[j]] += found.net_flux[i, j]
    net = np.maximum(flux - flux.T, 0)
    source, target = found.sets or (int(assignment[found.source[0]]), int(assignment[found.target[0]]))
    with warnings.catch_warnings():  # a handful of sets: the decomposition ends long before its limit
        warnings.filterwarnings("ignore", "Maximum number of iterations", RuntimeWarning)
        channels, capacities = pathways(csr_matrix(net), [source], [target], fraction=0.999, maxiter=100)
    total = net[source].sum()
    order = np.argsort(capacities)[::-1]
    # membership-weighted: a PCCA+ set that is no state's most likely set still has a place
    centers = model.plane[0]
    weights = msm.stationary_distribution[:, None] * (
        memberships if memberships is not None else np.eye(n_sets)[assignment]
    )
    return {
        "populations": msm.metastable_populations,
        "set_losses": np.asarray([row.get("mean_loss", np.nan) for row in model.sets]),
        "source_set": source,
        "target_set": target,
        "rate_per_step": found.rate,
        "mfpt_steps": found.mfpt,
        "pathways": [
            {"sets": [int(k) for k in channels[n]], "share": float(capacities[n] / total) if total > 0 else 0.0}
            for n in order
        ],
        "set_flux": net,
        "positions": (weights.T @ centers) / np.maximum(weights.sum(0), np.finfo(float).tiny)[:, None],
    }


# ----------------------------------------------------------------------------------------------- 5. the chain
def restart_points(replicas: int, fraction: float, visits: Sequence[float]) -> dict[int, int]:
    """Which replicas start from an earlier point (overlapping swarms), and from which candidate: the last
    ``round(fraction * replicas)`` replicas (replica 0 always starts at the current point) take the candidates of
    the fewest visits in the chain so far, least-visited first (adaptive sampling: where the chain is least
    certain). ``visits``: one count per candidate (NaN: unknown, taken last). Returns ``{replica: candidate}``."""
    n = min(round(fraction * replicas), replicas - 1, len(visits))
    order = np.argsort(np.nan_to_num(np.asarray(visits, dtype=float), nan=np.inf), kind="stable")
    return {replicas - 1 - k: int(order[k]) for k in range(n)}


@dataclass
class Chain:
    """One Markov chain of every replica recorded so far (all triggers): the fitted model (None while there are
    too few points), how many points it has and which fraction lies in its largest connected set, and the
    transition from the source point's set to the target point's (or why there is none)."""

    model: MarkovModel | None
    points: int
    connected: float
    transition: TransitionPaths | str
    source: tuple[int, int] | None = None  # the point whose set the transition starts from
    target: tuple[int, int] | None = None  # the point whose set it ends in
    robustness: Robustness | None = None  # what survives other clusterings, and whether the sets are metastable


@dataclass
class Robustness:
    """What of a chain's sets and transition survives a change of discretisation, and whether its sets are
    metastable at all (:func:`chain_robustness`)."""

    refits: list[tuple[int, int]]  # (k-means seed, states) of every refit
    agreement: list[float]  # per set of the chain: its worst best-match overlap (Jaccard of points) over the refits
    transition: float  # the fraction of refits in which the source and the target point lie in different sets
    metastable: bool  # the slowest implied timescales are separated from the lag and stable across lags
    timescales: list[float] = field(default_factory=list)  # those timescales (in lags), at the chain's lag

    def robust_sets(self, threshold: float = 0.5) -> list[int]:
        """The sets whose points are matched, overlap at least ``threshold``, by one set in every refit."""
        return [k for k, a in enumerate(self.agreement) if a >= threshold]

    @property
    def transition_survives(self) -> bool:
        """The transition is reported only when its sets are metastable and every refit has it too."""
        return self.metastable and self.transition == 1.0


def not_robust(robustness: Robustness) -> str:
    """Why a chain's transition is not reported, in one sentence."""
    if not robustness.metastable:
        scales = ", ".join(f"{t:.3g}" for t in robustness.timescales) or "none"
        return (
            f"its sets are not metastable (slowest implied timescales {scales} lags: not at least 2 lags and stable"
            " across lags), e.g. strata of one downhill relaxation; the transition between them is not reported"
        )
    return (
        f"the transition did not survive a change of discretisation: its two sets were apart in"
        f" {100 * robustness.transition:.0f}% of {len(robustness.refits)} refits (other k-means seeds and state counts)"
    )


def point_sets(model: MarkovModel) -> np.ndarray:
    """Every recorded point's metastable set (all trajectories concatenated): -1 outside the largest connected
    set; 0 for every point inside it when there is one set."""
    return set_labels(model.msm, np.concatenate(model.dtrajs))


def set_agreement(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """For every set ``k >= 0`` of ``reference`` (point labels), the largest Jaccard overlap of its points with the
    points of one set of ``other``: 1 when some set of ``other`` holds exactly its points.

    Example::

        >>> set_agreement(np.array([0, 0, 1, 1, -1]), np.array([1, 1, 1, 0, 0])).round(3).tolist()
        [0.667, 0.333]
    """
    rows = []
    for k in range(int(reference.max()) + 1 if len(reference) else 0):
        mine = reference == k
        best = 0.0
        for m in set(other[mine].tolist()) - {-1}:
            theirs = other == m
            best = max(best, float((mine & theirs).sum() / (mine | theirs).sum()))
        rows.append(best)
    return np.asarray(rows)


def metastable_timescales(msm: MarkovStateModel, sets: int, separation: float = 2.0, drift: float = 0.3) -> bool:
    """Whether ``sets`` metastable sets are supported: the ``sets - 1`` slowest implied timescales are at least
    ``separation`` lags (slower than the lag they are measured at, Prinz et al. 2011) and change by at most
    ``drift`` (relative) from the shortest lag over the next two (a plateau: the model is Markovian on their scale). A
    relaxation that runs downhill once, as replicas from the current point at temperature 0 do, fails it: its
    "sets" are strata of one descent, ordered along it, and their timescales are the descent's, which grow with
    the lag."""
    k = sets - 1
    if k < 1 or len(msm.timescales) < k or not np.isfinite(msm.timescales[:k]).all():
        return False
    if (np.asarray(msm.timescales[:k]) < separation).any():  # in units of the lag
        return False
    its = msm.implied_timescales
    if len(its) < 3 or its.shape[1] < k or not np.isfinite(its[:3, :k]).all():
        return False
    return bool((np.abs(its[1:3, :k] - its[0, :k]) <= drift * its[0, :k]).all())


def chain_robustness(
    features: list[np.ndarray],
    model: MarkovModel,
    config: MSMConfig,
    seed: int,
    source: tuple[int, int],
    target: tuple[int, int],
) -> Robustness:
    """Refit the chain with ``config.refit_seeds`` k-means seeds times ``config.refit_counts`` state counts (``n``,
    ``2n``, ... with ``n`` the chain's) and compare each refit's sets with the chain's, point by point
    (:func:`set_agreement`), and whether the refit separates the ``source`` point's set from the ``target`` point's.
    A metastable set of a landscape does not depend on where k-means puts its centres; a set that a change of seed
    dissolves is an artefact of the discretisation."""
    points = int(sum(len(f) for f in features))
    n = config.n_clusters or default_clusters(points)
    offsets = np.cumsum([0] + [len(d) for d in model.dtrajs])
    reference = point_sets(model)
    at = [int(offsets[t] + i) for t, i in (source, target)]
    refits, worst, apart = [], np.ones(int(reference.max()) + 1 if len(reference) else 0), []
    for count in [n * (m + 1) for m in range(config.refit_counts)]:
        for other_seed in [seed + r for r in range(config.refit_seeds)]:
            if (count, other_seed) == (n, seed) or count * 2 > points:
                continue
            refit = markov_model(features, replace(config, n_clusters=count), {}, other_seed)
            if refit is None:
                continue
            labels = point_sets(refit)
            refits.append((other_seed, count))
            worst = np.minimum(worst, set_agreement(reference, labels)) if len(worst) else worst
            apart.append(labels[at[0]] >= 0 and labels[at[1]] >= 0 and labels[at[0]] != labels[at[1]])
    msm = model.msm
    sets = int(msm.metastable_assignment.max()) + 1 if msm.metastable_assignment is not None else 1
    return Robustness(
        refits,
        worst.tolist(),
        float(np.mean(apart)) if apart else 1.0,
        metastable_timescales(msm, sets),
        np.asarray(msm.timescales[: max(sets - 1, 0)], dtype=float).tolist(),
    )


def chain_columns(width: int, seed: int = 0, size: int = 2048) -> np.ndarray:
    """The chain's features: a seeded subset of at most ``size`` of the ``width`` output coordinates (outputs on the
    probe set, flattened), sorted; the same for the same ``(width, seed)``."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(width, min(width, size), replace=False))


def chain_of(
    trajectories: list[np.ndarray],
    values: dict[str, list[np.ndarray]],
    sources: Sequence[tuple[int, int]],
    targets: Sequence[tuple[int, int]],
    config: MSMConfig,
    seed: int = 0,
    step: float = 1.0,
    dim: int | None = 5,
) -> Chain:
    """The chain of ``trajectories`` (features ``(n_t, d)`` of every recorded point, e.g. every replica of every
    trigger and the training path) with per-point ``values`` (e.g. ``{"loss": [...], "accuracy": [...]}``, one
    array per trajectory, NaN where unknown), and the transition from the metastable set of the first of
    ``sources`` that lies in the largest connected set to that of the last of ``targets`` that does (both
    ``(trajectory, index)`` points in order, e.g. the training path). The initial weights, where SGD runs downhill
    and no replica comes back, are often outside it, and so is the current point while the loss still falls: there
    is no metastable set there, and the transition runs from the first set that training entered to the last. The
    features are reduced to their first ``dim`` principal components, refitted on all points at every call (None:
    as they are).

    Outputs on the probe set are the features to use: invariant to permutations of hidden units, and blind to the
    weights' drift along flat directions, so replicas of different triggers meet in them where their sketches do
    not (measured on the digits study: 37% of the points in the largest connected set with outputs, 5% with
    sketches)."""
    features = list(trajectories)
    if dim is not None:
        stacked = np.concatenate(features)
        mean = stacked.mean(0)
        _, _, vt = np.linalg.svd(stacked - mean, full_matrices=False)
        features = [(f - mean) @ vt[:dim].T for f in features]
    model = markov_model(features, config, values, seed)
    points = int(sum(len(t) for t in trajectories))
    if model is None:
        return Chain(None, points, 0.0, "too few points for a chain")
    active = np.isin(np.concatenate(model.dtrajs), model.msm.active_set)

    def first_inside(candidates: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
        inside = (p for p in candidates if np.isin(model.dtrajs[p[0]][p[1]], model.msm.active_set))
        return next(inside, candidates[0] if len(candidates) else None)

    source, target = first_inside(sources), first_inside(list(targets)[::-1])
    if source is None or target is None:
        return Chain(model, points, float(active.mean()), "no source or target point")
    transition = transition_between(model, source, target, step)
    robustness = chain_robustness(features, model, config, seed, source, target)
    return Chain(model, points, float(active.mean()), transition, source, target, robustness)


def training_stages(
    model: MarkovModel, dtrajs: Sequence[np.ndarray], steps: Sequence[np.ndarray]
) -> list[dict[str, int]]:
    """The metastable stages of training: the training path's points (``dtrajs``, the chain's states of its pieces,
    with their optimizer ``steps``) by the metastable set they lie in, merged into runs of one set, in order:
    ``{"set", "first_step", "last_step", "points"}``; ``set`` -1 for points outside the largest connected set.
    Without metastable sets (one set), a single stage 0 while the path is inside the connected set."""
    stages: list[dict[str, int]] = []
    for states, times in zip(dtrajs, steps, strict=True):
        for label, at in zip(set_labels(model.msm, states).tolist(), times, strict=True):
            if stages and stages[-1]["set"] == label:
                stages[-1].update(last_step=int(at), points=stages[-1]["points"] + 1)
            else:
                stages.append({"set": label, "first_step": int(at), "last_step": int(at), "points": 1})
    return stages


__all__ = [
    "BARRIER_COLUMNS",
    "QUENCH_VECTORS",
    "BasinConfig",
    "BasinsResult",
    "Budget",
    "Chain",
    "CrossingNoise",
    "Joining",
    "MSMConfig",
    "MarkovModel",
    "Minimum",
    "PathConfig",
    "QuenchConfig",
    "SamplingConfig",
    "add_minimum",
    "barrier_rows",
    "basins_of",
    "chain_columns",
    "chain_of",
    "chain_robustness",
    "dips",
    "energy_resolution",
    "join_basins",
    "linear_saddle",
    "markov_model",
    "merge_level",
    "minimum_path",
    "noise_level",
    "not_robust",
    "plan_joins",
    "quench_point",
    "record_path",
    "refine_minimum",
    "restart_points",
    "sample",
    "training_stages",
    "transition_between",
    "transition_summary",
]
