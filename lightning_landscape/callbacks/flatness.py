"""FlatnessMonitor: local curvature and sharpness of the training loss, tracked over training.

At each trigger the callback evaluates the selected measures of
:mod:`lightning_landscape.curvature` on a fixed probe set of training samples (drawn once with
``probe.seed``), at the current parameters, in float32 (or ``probe.dtype``) with autocast off and BatchNorm in
``probe.bn_mode``. Under DDP the probe set is split over the ranks: rank 0 runs the estimators and every
Hessian-vector product is summed over the ranks
(:class:`~lightning_landscape.distributed.ShardedObjective`), so 2 ranks give what 1 process gives on the
same probe set.

Measures (``measures=...``):

================================ =========================================================================
``lambda_max``                   largest Hessian eigenvalue (Lanczos/ARPACK to relative ``spectrum.tol``)
``top_eigenvalues``              the ``spectrum.top_k`` largest eigenvalues (and a W&B table of them over training)
``lambda_min``                   smallest eigenvalue (negative: a saddle direction)
``trace``                        Hutch++ estimate of ``tr(H)`` with ``spectrum.trace_samples`` products, and its error
``density``                      SLQ spectral density (figure over training)
``eos_ratio``                    ``lambda_max`` over the stability limit of the optimizer (SGD with its momentum,
                                 dampening and Nesterov setting: ``2 / lr`` for plain SGD), 1 at the edge of
                                 stability; not reported for adaptive optimizers (Adam, ...), whose limit is
                                 one of the preconditioned Hessian. With several optimizers (GANs, manual
                                 optimization): ``eos_ratio/optimizer_<i>``, the largest eigenvalue of the
                                 Hessian block of the parameters optimizer ``i`` steps over its limit
``epsilon_sharpness``            Keskar et al., box radius ``sharpness.epsilon``
``adaptive_sharpness``           worst-case adaptive sharpness (radius ``sharpness.rho``)
``average_adaptive_sharpness``   average-case adaptive sharpness (radius ``sharpness.rho``)
``sam_sharpness``                one-step SAM sharpness (radius ``sharpness.rho``)
``pac_bayes_sigma``              largest Gaussian sigma raising the loss by ``pac_bayes_threshold``
``gradient_noise``               ``tr(Sigma)``, ``B_simple`` and the SGD temperature ``lr tr(Sigma)/(2Bd)``
================================ =========================================================================

Scalars go to every logger as ``landscape-flatness/<measure>``, and to ``trainer.callback_metrics`` on every
rank (for EarlyStopping, ModelCheckpoint or other callbacks). Per-layer values of
``lambda_max`` and ``trace`` are logged as ``<measure>/<layer>`` for each entry of ``layers``.

Example::

    from lightning_landscape import FlatnessMonitor
    monitor = FlatnessMonitor(every_n_steps=500, measures=["lambda_max", "trace", "density"],
                              layers={"first": ["network.1.*"]})
    trainer = L.Trainer(callbacks=[monitor])
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from typing_extensions import override

from lightning_landscape import budget as clock
from lightning_landscape import curvature, distributed
from lightning_landscape.callbacks.base import LandscapeCallback, global_batch_size
from lightning_landscape.checks import as_config, check_float, check_int
from lightning_landscape.curvature.operator import parameter_indices
from lightning_landscape.params import ParameterLayout
from lightning_landscape.probe import ProbeSpec
from lightning_landscape.report.logged import Logged
from lightning_landscape.report.plots import eigenvalue_figure, spectral_density_figure

if TYPE_CHECKING:
    import lightning.pytorch as pl

MEASURES = (
    "lambda_max",
    "top_eigenvalues",
    "lambda_min",
    "trace",
    "density",
    "eos_ratio",
    "epsilon_sharpness",
    "adaptive_sharpness",
    "average_adaptive_sharpness",
    "sam_sharpness",
    "pac_bayes_sigma",
    "gradient_noise",
)


#: Hessian-vector products the cheapest Hessian measure needs (Lanczos' least number of steps for lambda_max): the
#: probe set is cut to what a trigger's budget affords for this many
MIN_PRODUCTS = 12


@dataclass
class SpectrumConfig:
    """How the Hessian's spectrum is estimated.

    Args:
        top_k: eigenvalues for ``top_eigenvalues``.
        tol: relative accuracy of the eigenvalues.
        method: ``"lanczos"`` (torch-native, measured fastest here), ``"arpack"`` or ``"power"``.
        trace_samples: Hessian-vector products for the Hutch++ trace (at least 3).
        density_vectors: SLQ start vectors of the spectral density.
        density_steps: Lanczos steps of each.
    """

    top_k: int = 5
    tol: float = 1e-3
    method: str = "lanczos"
    trace_samples: int = 15
    density_vectors: int = 3
    density_steps: int = 40

    def __post_init__(self) -> None:
        check_int("spectrum.top_k", self.top_k, example=5)
        check_int("spectrum.trace_samples", self.trace_samples, minimum=3, example=15)
        check_int("spectrum.density_vectors", self.density_vectors, example=3)
        check_int("spectrum.density_steps", self.density_steps, minimum=2, example=40)
        check_float("spectrum.tol", self.tol, hint="e.g. `tol=1e-3` (relative).")
        if self.method not in ("lanczos", "arpack", "power"):
            raise ValueError(
                f"`spectrum.method` must be 'lanczos', 'arpack' or 'power', got {self.method!r}. HINT: 'lanczos'."
            )


@dataclass
class SharpnessConfig:
    """The radii of the sharpness measures.

    Args:
        epsilon: box radius of epsilon-sharpness (Keskar et al.).
        rho: radius of SAM and adaptive sharpness.
        pac_bayes_threshold: loss increase that defines the PAC-Bayes sigma.
    """

    epsilon: float = 1e-3
    rho: float = 0.05
    pac_bayes_threshold: float = 0.1

    def __post_init__(self) -> None:
        check_float("sharpness.epsilon", self.epsilon, hint="e.g. `epsilon=1e-3`.")
        check_float("sharpness.rho", self.rho, hint="e.g. `rho=0.05`.")
        check_float("sharpness.pac_bayes_threshold", self.pac_bayes_threshold, hint="e.g. `pac_bayes_threshold=0.1`.")


class FlatnessMonitor(LandscapeCallback):
    """Hessian eigenvalues, trace, spectral density and sharpness measures of the training loss.

    Args:
        measures: names from :data:`MEASURES` (see the module docstring).
        every_n_steps: run every ``n`` optimizer steps (default 1000: a trigger costs about 70 training steps
            on the MNIST MLP, see ``scripts/bench_curvature.py``).
        every_n_epochs: run at the end of every ``n``-th epoch.
        at_fit_end: run when training ends.
        spectrum: how eigenvalues, trace and density are estimated (:class:`SpectrumConfig` or a dict of its fields:
            ``top_k``, ``tol``, ``method``, ``trace_samples``, ``density_vectors``, ``density_steps``).
        sharpness: the radii of the sharpness measures (:class:`SharpnessConfig`: ``epsilon``, ``rho``,
            ``pac_bayes_threshold``).
        layers: per-layer ``lambda_max``/``trace``: ``{label: [name patterns]}`` or a list of patterns.
        probe: the probe set and the energy (:class:`~lightning_landscape.probe.ProbeSpec` or a dict; BatchNorm in
            ``"eval"`` mode unless it says otherwise), see :class:`~lightning_landscape.callbacks.LandscapeCallback`.
        progress: see :class:`~lightning_landscape.callbacks.LandscapeCallback`.
        key_prefix: keys are ``<key_prefix>-flatness/<measure>`` (see :class:`LandscapeCallback`).
        budget: the share of training time the triggers may take (default 4%, at least 10 s a trigger; see
            :class:`LandscapeCallback`): Lanczos, the Hutchinson samples and the SLQ vectors stop at the deadline with
            what they have (``lambda_max_converged`` 0), and the measures not started by then are cut
            (``measures_cut``, the ``cut`` event naming them). When 12 Hessian-vector products on the whole probe
            set do not fit in the budget (a transformer on a CPU), the Hessian measures use its first batches only
            (``probe_fraction``, a ``cut`` event).
        seed: seed of the random vectors of the estimators.

    Raises:
        ValueError: for an unknown measure or a non-positive setting (in the constructor).
    """

    default_share = 0.04  # of training time (the floor: 10 s a trigger)
    name = "flatness"
    gathers_fsdp2 = True  # Hessian-vector products of the gathered parameters, summed over the data-parallel ranks
    #: what it logs (the dashboard's panels); ``lambda_<i>`` for ``top_k``, ``<measure>/<layer>`` for ``layers``
    logged = Logged(
        scalars=(
            *(m for m in MEASURES if m not in ("top_eigenvalues", "density", "gradient_noise")),
            "lambda_[0-9]*",
            "lambda_max/*",
            "trace/*",
            "stability_limit",
            "eos_ratio/*",
            "stability_limit/*",
            "trace_std_error",
            "trace_ci95_low",
            "trace_ci95_high",
            "grad_noise_trace",
            "b_simple",
            "temperature",
            "n_hvp",
            "lambda_max_converged",
            "measures_cut",
            "probe_fraction",
            "seconds",
            "budget_seconds",
            "skipped",
            "failures",
        ),
        media=("eigenvalues", "spectral_density"),
        tables=("top_eigenvalues",),
    )

    def __init__(
        self,
        measures: Sequence[str] = ("lambda_max", "trace", "eos_ratio"),
        every_n_steps: int | None = 1000,
        every_n_epochs: int | None = None,
        at_fit_end: bool = True,
        spectrum: SpectrumConfig | dict | None = None,
        sharpness: SharpnessConfig | dict | None = None,
        layers: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
        probe: ProbeSpec | dict | None = None,
        seed: int = 0,
        progress: bool = True,
        key_prefix: str = "landscape",
        budget: Any = "default",
    ) -> None:
        super().__init__(
            every_n_steps=every_n_steps,
            every_n_epochs=every_n_epochs,
            at_fit_end=at_fit_end,
            probe=probe,
            progress=progress,
            key_prefix=key_prefix,
            budget=budget,
        )
        self.spectrum: SpectrumConfig = as_config(SpectrumConfig, spectrum, "spectrum")
        self.sharpness: SharpnessConfig = as_config(SharpnessConfig, sharpness, "sharpness")
        if isinstance(measures, str):
            raise ValueError(f"`measures` must be a list of names, got the string {measures!r}. HINT: [{measures!r}].")
        repeated = sorted({m for m in measures if list(measures).count(m) > 1})
        if repeated:
            raise ValueError(f"`measures` names {repeated} more than once. HINT: name each measure once.")
        unknown = [m for m in measures if m not in MEASURES]
        if unknown or not measures:
            raise ValueError(
                f"`measures` has unknown names {unknown} (or is empty). HINT: choose from {list(MEASURES)}."
            )
        check_int("seed", seed, minimum=0, example=0)
        if isinstance(layers, str):
            raise ValueError(f"`layers` must be a list of name patterns or a dict, got {layers!r}. HINT: [{layers!r}].")
        if isinstance(layers, Mapping):  # {"label": "pattern"} means one pattern, not the letters of a string
            layers = {label: [p] if isinstance(p, str) else list(p) for label, p in layers.items()}
            for label, patterns in layers.items():
                if not isinstance(label, str) or not label.strip() or "/" in label:
                    raise ValueError(
                        f"`layers` label {label!r} must be a non-empty name without '/' (it becomes the key"
                        " `lambda_max/<label>`). HINT: e.g. `layers={'first': ['net.0.*']}`."
                    )
                if not patterns or not all(isinstance(p, str) and p.strip() for p in patterns):
                    raise ValueError(
                        f"`layers[{label!r}]` must be a name pattern or a list of them, got {patterns!r}."
                        " HINT: e.g. `layers={'first': ['net.0.*']}`."
                    )
        self.measures = tuple(measures)
        self.layers = dict(layers) if isinstance(layers, Mapping) else {p: [p] for p in (layers or [])}
        self.seed = seed
        self.history: list[dict[str, Any]] = []
        self._eigenvalues: list[tuple[int, list[float]]] = []
        self._densities: list[tuple[int, np.ndarray, np.ndarray]] = []
        self._hvp_seconds: float | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            layout = ParameterLayout.from_module(pl_module)
            self.check_memory(layout.numel, pl_module.device)
            for label, patterns in self.layers.items():  # a pattern that matches nothing fails now, not at a trigger
                try:
                    parameter_indices(layout, patterns)
                except ValueError as err:
                    raise ValueError(f"`layers[{label!r}]`: {err}") from None

    def check_memory(self, n_params: int, device: torch.device) -> None:
        """Refuse, before training starts, measures whose smallest basis cannot fit in half the free memory
        (:mod:`~lightning_landscape.curvature.memory`): Lanczos needs ``max(2k + 8, 12)`` vectors of ``P`` entries for
        ``k`` eigenvalues, SLQ ``density_steps``, ARPACK ``max(2k + 1, 20)`` float64 ones, power iteration ``k``."""
        want = set(self.measures)
        k = self.spectrum.top_k if "top_eigenvalues" in want else 1
        needs = []
        if want & {"lambda_max", "top_eigenvalues", "eos_ratio", "lambda_min"} or self.layers:
            sizes = {"lanczos": (max(2 * k + 8, 12), self.probe.dtype), "arpack": (max(2 * k + 1, 20), torch.float64)}
            vectors, dtype = sizes.get(self.spectrum.method, (k, self.probe.dtype))
            needs.append((vectors, dtype, f"spectrum.method={self.spectrum.method!r} with top_k={k}"))
        if "density" in want:
            needs.append(
                (
                    self.spectrum.density_steps,
                    self.probe.dtype,
                    f"density with spectrum.density_steps={self.spectrum.density_steps}",
                )
            )
        for vectors, dtype, what in needs:
            curvature.check_vectors(
                vectors + 4,  # and the working vectors of a Hessian-vector product
                n_params,
                dtype,
                device,
                f"FlatnessMonitor ({what}) on {n_params:,} parameters",
                "spectrum.method='power' (top_k vectors), a smaller spectrum.top_k or spectrum.density_steps,"
                " probe.dtype=float32, or a model part via `layers`.",
            )

    # ------------------------------------------------------------------ the measurements
    @override
    def stages(self) -> int:
        want = set(self.measures)
        eigen = bool(want & {"lambda_max", "top_eigenvalues", "eos_ratio"})
        return int(eigen) + sum(m in want for m in ("lambda_min", "trace", "density"))

    def _optimizer_settings(
        self, trainer: pl.Trainer, layout: ParameterLayout
    ) -> tuple[float | None, dict[str, tuple[float, list[str]]], int | None]:
        """``(lr, limits, global batch size)``: the first optimizer's learning rate, and the stability limit of each
        SGD optimizer with the trainable parameters it steps, keyed ``""`` when there is one optimizer and
        ``optimizer_<i>`` when there are several (adaptive optimizers have none)."""
        if not trainer.optimizers:
            return None, {}, None
        names = {id(p): n for n, p in trainer.lightning_module.named_parameters()}
        several = len(trainer.optimizers) > 1
        limits: dict[str, tuple[float, list[str]]] = {}
        for i, optimizer in enumerate(trainer.optimizers):
            group = optimizer.param_groups[0]
            if isinstance(optimizer, torch.optim.SGD):
                momentum, dampening = float(group.get("momentum") or 0.0), float(group.get("dampening") or 0.0)
                limit = curvature.stability_limit(float(group["lr"]), momentum, dampening, bool(group.get("nesterov")))
                stepped = [names[id(p)] for g in optimizer.param_groups for p in g["params"] if id(p) in names]
                stepped = [n for n in stepped if n in set(layout.names)]
                if stepped:
                    limits[f"optimizer_{i}" if several else ""] = (limit, stepped)
            elif "eos_ratio" in self.measures and not getattr(self, "_noted_adaptive", False):
                self._noted_adaptive = True
                warnings.warn(
                    f"lightning-landscape: FlatnessMonitor reports no `eos_ratio` for {type(optimizer).__name__}: the"
                    " stability limit of an adaptive optimizer is one of the preconditioned Hessian (Cohen et al."
                    " 2022), not of lambda_max. lambda_max is still reported.",
                    UserWarning,
                    stacklevel=2,
                )
        lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        return lr, limits, global_batch_size(trainer)

    def _hvp_seconds_per_batch(self, trainer: pl.Trainer, obj: Any) -> float:
        """Seconds of one Hessian-vector product on one probe batch, timed once (rank 0, at the first trigger with a
        deadline): what :meth:`affordable_probe` sizes the Hessian measures' probe set by."""
        if self._hvp_seconds is None and trainer.is_global_zero and math.isfinite(self.time_left()):
            one = obj.first_batches(1)
            start = time.perf_counter()
            one.hvp(None, torch.randn(one.numel, generator=torch.Generator().manual_seed(0)).to(one.theta0))
            self._hvp_seconds = time.perf_counter() - start
        return self._hvp_seconds or 0.0

    def _estimate(self, obj: Any, limits: dict[str, tuple[float, list[str]]]) -> dict[str, Any]:
        """All Hessian-based measures within the trigger's budget; runs on rank 0 with a sharded objective.

        Anytime: the iterative estimators stop at the budget's deadline with what they have (Lanczos' Ritz values,
        ``lambda_max_converged`` 0; the Hutchinson samples so far, with their larger standard error; fewer SLQ
        vectors), and the measures not started by then are cut (``measures_cut``, and the ``cut`` event naming
        them)."""
        with clock.deadline(self.time_left(), getattr(self, "_trainer_ref", None)):
            return self._measures(obj, limits)

    def _measures(self, obj: Any, limits: dict[str, tuple[float, list[str]]]) -> dict[str, Any]:
        want = set(self.measures)
        out: dict[str, Any] = {"scalars": {}, "n_hvp": 0, "cut": []}
        s = out["scalars"]

        def due(*names: str) -> bool:
            asked = [n for n in names if n in want]
            if asked and clock.time_up():
                out["cut"] += asked
                return False
            return bool(asked)

        if due("lambda_max", "top_eigenvalues", "eos_ratio"):
            k = self.spectrum.top_k if "top_eigenvalues" in want else 1
            res = curvature.hessian_eigenvalues(
                obj, k=min(k, obj.numel - 1), tol=self.spectrum.tol, method=self.spectrum.method, seed=self.seed
            )
            out["top_eigenvalues"] = res.eigenvalues.tolist()
            out["n_hvp"] += res.n_hvp
            s["lambda_max_converged"] = float(res.converged)
            s["lambda_max"] = out["top_eigenvalues"][0]
            if "top_eigenvalues" in want:
                s.update({f"lambda_{i + 1}": v for i, v in enumerate(out["top_eigenvalues"])})
            if "" in limits:  # one optimizer; the reference line next to lambda_max: 2/lr for plain SGD
                s["stability_limit"] = limits[""][0]
                if "eos_ratio" in want:
                    s["eos_ratio"] = s["lambda_max"] / limits[""][0]
            self.advance("eigenvalues")
        if "eos_ratio" in want:  # several optimizers: each one's lambda_max, of the parameters it steps
            for label, (limit, names) in (item for item in limits.items() if item[0]):
                if clock.time_up():
                    out["cut"].append(f"eos_ratio/{label}")
                    continue
                if len(names) == len(obj.layout.names):
                    lam = s["lambda_max"]
                else:
                    res = curvature.hessian_eigenvalues(
                        obj, k=1, tol=self.spectrum.tol, method=self.spectrum.method, params=names, seed=self.seed
                    )
                    lam = float(res.eigenvalues[0])
                    out["n_hvp"] += res.n_hvp
                s[f"eos_ratio/{label}"], s[f"stability_limit/{label}"] = lam / limit, limit
        if due("lambda_min"):
            res = curvature.hessian_eigenvalues(
                obj, k=1, which="smallest", tol=self.spectrum.tol, method=self.spectrum.method, seed=self.seed
            )
            s["lambda_min"] = float(res.eigenvalues[0])
            out["n_hvp"] += res.n_hvp
            self.advance("lambda_min")
        if due("trace"):
            tr = curvature.hessian_trace(obj, self.spectrum.trace_samples, seed=self.seed)
            s["trace"], s["trace_std_error"] = tr.estimate, tr.std_error
            s["trace_ci95_low"], s["trace_ci95_high"] = tr.interval(0.95)
            out["n_hvp"] += tr.n_hvp
            self.advance("trace")
        for label, patterns in self.layers.items():
            if clock.time_up():
                out["cut"].append(f"layer {label}")
                continue
            if want & {"lambda_max", "top_eigenvalues", "eos_ratio"}:
                res = curvature.hessian_eigenvalues(
                    obj, k=1, tol=self.spectrum.tol, method=self.spectrum.method, params=patterns, seed=self.seed
                )
                s[f"lambda_max/{label}"] = float(res.eigenvalues[0])
                out["n_hvp"] += res.n_hvp
            if "trace" in want:
                tr = curvature.hessian_trace(obj, self.spectrum.trace_samples, params=patterns, seed=self.seed)
                s[f"trace/{label}"] = tr.estimate
                out["n_hvp"] += tr.n_hvp
        if due("density"):
            d = curvature.spectral_density(
                obj, self.spectrum.density_vectors, self.spectrum.density_steps, seed=self.seed
            )
            out["density"] = {"nodes": d.nodes, "weights": d.weights, "grid": d.grid, "density": d.density}
            out["n_hvp"] += d.n_hvp
            self.advance("density")
        if due("epsilon_sharpness"):
            s["epsilon_sharpness"] = curvature.epsilon_sharpness(obj, self.sharpness.epsilon, seed=self.seed).value
        if due("adaptive_sharpness"):
            s["adaptive_sharpness"] = curvature.adaptive_sharpness(
                obj, self.sharpness.rho, "worst", seed=self.seed
            ).value
        if due("average_adaptive_sharpness"):
            res = curvature.adaptive_sharpness(obj, self.sharpness.rho, "average", seed=self.seed)
            s["average_adaptive_sharpness"] = res.value
        if due("sam_sharpness"):
            s["sam_sharpness"] = curvature.sam_sharpness(obj, self.sharpness.rho).value
        if due("pac_bayes_sigma"):
            s["pac_bayes_sigma"] = curvature.pac_bayes_sigma(
                obj, self.sharpness.pac_bayes_threshold, seed=self.seed
            ).value
        return out

    @override
    def analyze(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        strategy = trainer.strategy
        with self.stage(trainer, "probe objective"):
            obj = self.objective(trainer, pl_module)
            lr, limits, batch_size = self._optimizer_settings(trainer, obj.layout)
        scalars: dict[str, float] = {}
        if "gradient_noise" in self.measures:  # per-sample sums on every rank, added up
            with self.stage(trainer, "gradient noise"):
                m = curvature.gradient_moments(obj)
            m.grad_sum = distributed.reduce_sum(strategy, m.grad_sum)
            m.sq_norm_sum = distributed.reduce_sum(strategy, m.sq_norm_sum)
            m.n = int(distributed.reduce_sum(strategy, torch.tensor(m.n, device=obj.device)))
            with self.stage(trainer, "gradient noise"):
                noise = curvature.gradient_noise(m, lr, batch_size)
            scalars.update(grad_noise_trace=noise.trace_cov, b_simple=noise.b_simple)
            if noise.temperature is not None:
                scalars["temperature"] = noise.temperature
        hessian_measures = set(self.measures) - {"gradient_noise"}
        out: dict[str, Any] = {"scalars": {}, "n_hvp": 0}
        if hessian_measures:
            with self.stage(trainer, "probe size"):
                per_batch = self._hvp_seconds_per_batch(trainer, obj)
            used = self.affordable_probe(trainer, obj, per_batch, MIN_PRODUCTS, step)
            scalars["probe_fraction"] = sum(used.batch_sizes) / sum(obj.batch_sizes)
            sharded = distributed.ShardedObjective(strategy, used)
            with self.stage(trainer, "Hessian measures"):  # run() joins every collective before it raises
                out = sharded.run(lambda o: self._estimate(o, limits))
        scalars.update(out["scalars"])
        scalars["n_hvp"] = out["n_hvp"]
        scalars["measures_cut"] = len(out.get("cut", []))
        if out.get("cut"):
            self.reporter.event("cut", {"step": step, "cut": out["cut"], "why": "the trigger's budget ran out"})
        record = {"step": step, "epoch": trainer.current_epoch, **scalars}
        self.history.append(record)
        self._report(step, scalars, out, obj.metadata, limits[""][0] if "" in limits else None)

    def _report(
        self, step: int, scalars: dict[str, float], out: dict[str, Any], meta: dict, limit: float | None
    ) -> None:
        rep = self.reporter
        rep.scalars({k: v for k, v in scalars.items() if math.isfinite(v)}, step)
        metadata = {**meta, **self.probe_metadata, "step": step, "tol": self.spectrum.tol, "seed": self.seed}
        arrays: dict[str, Any] = {k: np.asarray(v) for k, v in scalars.items()}
        if "top_eigenvalues" in self.measures and "top_eigenvalues" in out:
            arrays["top_eigenvalues"] = np.asarray(out["top_eigenvalues"])
            self._eigenvalues.append((step, out["top_eigenvalues"]))
            rows = [[s, i + 1, v] for s, values in self._eigenvalues for i, v in enumerate(values)]
            rep.table("top_eigenvalues", ["step", "index", "eigenvalue"], rows, step)
            steps, values = zip(*self._eigenvalues, strict=True)
            rep.figure("eigenvalues", eigenvalue_figure(steps, values, limit), step)
        if "density" in out:
            d = out["density"]
            arrays.update({f"density_{k}": v for k, v in d.items()})
            self._densities.append((step, d["grid"], d["density"]))
            rep.figure("spectral_density", spectral_density_figure(self._densities), step)
        rep.arrays("flatness", step, metadata=metadata, **arrays)

    @override
    def reset(self) -> None:
        super().reset()
        self.history, self._eigenvalues, self._densities = [], [], []
        self._hvp_seconds = None  # one Hessian-vector product on one probe batch, timed once

    @override
    def state_dict(self) -> dict[str, Any]:
        # the figures' history too: a resumed run draws every trigger since the start
        return {
            **super().state_dict(),
            "history": self.history,
            "eigenvalues": list(self._eigenvalues),
            "densities": list(self._densities),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.history = list(state_dict.get("history", []))
        self._eigenvalues = list(state_dict.get("eigenvalues", []))
        self._densities = list(state_dict.get("densities", []))
