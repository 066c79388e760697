"""FlatnessMonitor: local curvature and sharpness of the training loss, tracked over training.

At each trigger the callback evaluates the selected measures of
:mod:`lightning_landscape.curvature` on a fixed probe set of training samples (drawn once with
``probe_seed``), at the current parameters, in float32 (or ``dtype``) with autocast off and BatchNorm in
``bn_mode``. Under DDP the probe set is split over the ranks: rank 0 runs the estimators and every
Hessian-vector product is summed over the ranks
(:class:`~lightning_landscape.distributed.ShardedObjective`), so 2 ranks give what 1 process gives on the
same probe set.

Measures (``measures=...``):

================================ =========================================================================
``lambda_max``                   largest Hessian eigenvalue (Lanczos/ARPACK to relative ``tol``)
``top_eigenvalues``              the ``top_k`` largest eigenvalues (and a W&B table of them over training)
``lambda_min``                   smallest eigenvalue (negative: a saddle direction)
``trace``                        Hutch++ estimate of ``tr(H)`` with ``trace_samples`` products, and its error
``density``                      SLQ spectral density (figure over training)
``eos_ratio``                    ``lambda_max`` over the stability limit of the optimizer (SGD with its momentum,
                                 dampening and Nesterov setting: ``2 / lr`` for plain SGD), 1 at the edge of
                                 stability; not reported for adaptive optimizers (Adam, ...), whose limit is
                                 one of the preconditioned Hessian
``epsilon_sharpness``            Keskar et al., box radius ``epsilon``
``adaptive_sharpness``           worst-case adaptive sharpness (radius ``rho``)
``average_adaptive_sharpness``   average-case adaptive sharpness (radius ``rho``)
``sam_sharpness``                one-step SAM sharpness (radius ``rho``)
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
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from typing_extensions import override

from lightning_landscape import budget as clock
from lightning_landscape import curvature, distributed
from lightning_landscape.callbacks.base import LandscapeCallback, global_batch_size
from lightning_landscape.checks import check_float, check_int
from lightning_landscape.curvature.operator import parameter_indices
from lightning_landscape.objective import BNMode, LossFn
from lightning_landscape.params import ParameterLayout
from lightning_landscape.report.dashboard import Logged
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


class FlatnessMonitor(LandscapeCallback):
    """Hessian eigenvalues, trace, spectral density and sharpness measures of the training loss.

    Args:
        measures: names from :data:`MEASURES` (see the module docstring).
        every_n_steps: run every ``n`` optimizer steps (default 1000: a trigger costs about 70 training steps
            on the MNIST MLP, see ``scripts/bench_curvature.py``).
        every_n_epochs: run at the end of every ``n``-th epoch.
        at_fit_end: run when training ends.
        top_k: eigenvalues for ``top_eigenvalues``.
        tol: relative accuracy of the eigenvalues.
        eigen_method: ``"lanczos"`` (torch-native, measured fastest here), ``"arpack"`` or ``"power"``.
        trace_samples: Hessian-vector products for the trace.
        density_vectors: SLQ start vectors; density_steps: Lanczos steps each.
        epsilon: box radius of epsilon-sharpness; rho: radius of SAM/adaptive sharpness.
        pac_bayes_threshold: loss increase that defines the PAC-Bayes sigma.
        layers: per-layer ``lambda_max``/``trace``: ``{label: [name patterns]}`` or a list of patterns.
        probe_size, probe_batch_size, probe_seed, bn_mode, loss_fn, probe_batches, progress: see
            :class:`~lightning_landscape.callbacks.LandscapeCallback`.
        dtype: ``torch.float32`` or ``torch.float64``.
        key_prefix: keys are ``<key_prefix>-flatness/<measure>`` (see :class:`LandscapeCallback`).
        budget: the share of training time the triggers may take (default 4%, at least 10 s a trigger; see
            :class:`LandscapeCallback`): Lanczos, the Hutchinson samples and the SLQ vectors stop at the deadline with
            what they have (``lambda_max_converged`` 0), and the measures not started by then are cut
            (``measures_cut``, the ``cut`` event naming them).
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
            "trace_std_error",
            "trace_ci95_low",
            "trace_ci95_high",
            "grad_noise_trace",
            "b_simple",
            "temperature",
            "n_hvp",
            "lambda_max_converged",
            "measures_cut",
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
        top_k: int = 5,
        tol: float = 1e-3,
        eigen_method: str = "lanczos",
        trace_samples: int = 15,
        density_vectors: int = 3,
        density_steps: int = 40,
        epsilon: float = 1e-3,
        rho: float = 0.05,
        pac_bayes_threshold: float = 0.1,
        layers: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
        probe_size: int = 256,
        probe_batch_size: int | None = None,
        probe_seed: int = 0,
        bn_mode: BNMode = "eval",
        loss_fn: LossFn | None = None,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        progress: bool = True,
        probe_batches: list[Any] | None = None,
        key_prefix: str = "landscape",
        budget: Any = "default",
    ) -> None:
        super().__init__(
            every_n_steps=every_n_steps,
            every_n_epochs=every_n_epochs,
            at_fit_end=at_fit_end,
            probe_size=probe_size,
            probe_batch_size=probe_batch_size,
            probe_seed=probe_seed,
            bn_mode=bn_mode,
            loss_fn=loss_fn,
            progress=progress,
            dtype=dtype,
            probe_batches=probe_batches,
            key_prefix=key_prefix,
            budget=budget,
        )
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
        check_int("top_k", top_k, example=5)
        check_int("trace_samples", trace_samples, example=15)
        check_int("density_vectors", density_vectors, example=3)
        check_int("density_steps", density_steps, minimum=2, example=40)
        check_int("seed", seed, minimum=0, example=0)
        check_float("tol", tol, hint="e.g. `tol=1e-3` (relative).")
        check_float("epsilon", epsilon, hint="e.g. `epsilon=1e-3`.")
        check_float("rho", rho, hint="e.g. `rho=0.05`.")
        check_float("pac_bayes_threshold", pac_bayes_threshold, hint="e.g. `pac_bayes_threshold=0.1`.")
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
        if trace_samples < 3 and "trace" in measures:
            raise ValueError(f"`trace_samples` must be at least 3 for Hutch++, got {trace_samples}.")
        self.measures = tuple(measures)
        if eigen_method not in ("lanczos", "arpack", "power"):
            raise ValueError(f"`eigen_method` must be 'lanczos', 'arpack' or 'power', got {eigen_method!r}.")
        self.top_k, self.tol, self.trace_samples = top_k, tol, trace_samples
        self.eigen_method = eigen_method
        self.density_vectors, self.density_steps = density_vectors, density_steps
        self.epsilon, self.rho, self.pac_bayes_threshold = epsilon, rho, pac_bayes_threshold
        self.layers = dict(layers) if isinstance(layers, Mapping) else {p: [p] for p in (layers or [])}
        self.seed = seed
        self.history: list[dict[str, Any]] = []
        self._eigenvalues: list[tuple[int, list[float]]] = []
        self._densities: list[tuple[int, np.ndarray, np.ndarray]] = []

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
        k = self.top_k if "top_eigenvalues" in want else 1
        needs = []
        if want & {"lambda_max", "top_eigenvalues", "eos_ratio", "lambda_min"} or self.layers:
            sizes = {"lanczos": (max(2 * k + 8, 12), self.dtype), "arpack": (max(2 * k + 1, 20), torch.float64)}
            vectors, dtype = sizes.get(self.eigen_method, (k, self.dtype))
            needs.append((vectors, dtype, f"eigen_method={self.eigen_method!r} with top_k={k}"))
        if "density" in want:
            needs.append((self.density_steps, self.dtype, f"density with density_steps={self.density_steps}"))
        for vectors, dtype, what in needs:
            curvature.check_vectors(
                vectors + 4,  # and the working vectors of a Hessian-vector product
                n_params,
                dtype,
                device,
                f"FlatnessMonitor ({what}) on {n_params:,} parameters",
                "eigen_method='power' (top_k vectors), a smaller top_k or density_steps, dtype=torch.float32,"
                " or a model part via `layers`.",
            )

    # ------------------------------------------------------------------ the measurements
    @override
    def stages(self) -> int:
        want = set(self.measures)
        eigen = bool(want & {"lambda_max", "top_eigenvalues", "eos_ratio"})
        return int(eigen) + sum(m in want for m in ("lambda_min", "trace", "density"))

    def _optimizer_settings(self, trainer: pl.Trainer) -> tuple[float | None, float | None, int | None]:
        """``(lr, stability limit, global batch size)``; the limit is None for optimizers other than SGD."""
        if not trainer.optimizers:
            return None, None, None
        optimizer = trainer.optimizers[0]
        group = optimizer.param_groups[0]
        lr = float(group["lr"])
        limit = None
        if isinstance(optimizer, torch.optim.SGD):
            momentum, dampening = float(group.get("momentum") or 0.0), float(group.get("dampening") or 0.0)
            limit = curvature.stability_limit(lr, momentum, dampening, bool(group.get("nesterov", False)))
        elif "eos_ratio" in self.measures and not getattr(self, "_noted_adaptive", False):
            self._noted_adaptive = True
            warnings.warn(
                f"lightning-landscape: FlatnessMonitor reports no `eos_ratio` for {type(optimizer).__name__}: the"
                " stability limit of an adaptive optimizer is one of the preconditioned Hessian (Cohen et al. 2022),"
                " not of lambda_max. lambda_max is still reported.",
                UserWarning,
                stacklevel=2,
            )
        return lr, limit, global_batch_size(trainer)

    def _estimate(self, obj: Any, limit: float | None) -> dict[str, Any]:
        """All Hessian-based measures within the trigger's budget; runs on rank 0 with a sharded objective.

        Anytime: the iterative estimators stop at the budget's deadline with what they have (Lanczos' Ritz values,
        ``lambda_max_converged`` 0; the Hutchinson samples so far, with their larger standard error; fewer SLQ
        vectors), and the measures not started by then are cut (``measures_cut``, and the ``cut`` event naming
        them)."""
        with clock.deadline(self.time_left(), getattr(self, "_trainer_ref", None)):
            return self._measures(obj, limit)

    def _measures(self, obj: Any, limit: float | None) -> dict[str, Any]:
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
            k = self.top_k if "top_eigenvalues" in want else 1
            res = curvature.hessian_eigenvalues(
                obj, k=min(k, obj.numel - 1), tol=self.tol, method=self.eigen_method, seed=self.seed
            )
            out["top_eigenvalues"] = res.eigenvalues.tolist()
            out["n_hvp"] += res.n_hvp
            s["lambda_max_converged"] = float(res.converged)
            s["lambda_max"] = out["top_eigenvalues"][0]
            if "top_eigenvalues" in want:
                s.update({f"lambda_{i + 1}": v for i, v in enumerate(out["top_eigenvalues"])})
            if "eos_ratio" in want and limit is not None:
                s["eos_ratio"] = s["lambda_max"] / limit
            if limit is not None:  # the reference line next to lambda_max: 2/lr for plain SGD
                s["stability_limit"] = limit
            self.advance("eigenvalues")
        if due("lambda_min"):
            res = curvature.hessian_eigenvalues(
                obj, k=1, which="smallest", tol=self.tol, method=self.eigen_method, seed=self.seed
            )
            s["lambda_min"] = float(res.eigenvalues[0])
            out["n_hvp"] += res.n_hvp
            self.advance("lambda_min")
        if due("trace"):
            tr = curvature.hessian_trace(obj, self.trace_samples, seed=self.seed)
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
                    obj, k=1, tol=self.tol, method=self.eigen_method, params=patterns, seed=self.seed
                )
                s[f"lambda_max/{label}"] = float(res.eigenvalues[0])
                out["n_hvp"] += res.n_hvp
            if "trace" in want:
                tr = curvature.hessian_trace(obj, self.trace_samples, params=patterns, seed=self.seed)
                s[f"trace/{label}"] = tr.estimate
                out["n_hvp"] += tr.n_hvp
        if due("density"):
            d = curvature.spectral_density(obj, self.density_vectors, self.density_steps, seed=self.seed)
            out["density"] = {"nodes": d.nodes, "weights": d.weights, "grid": d.grid, "density": d.density}
            out["n_hvp"] += d.n_hvp
            self.advance("density")
        if due("epsilon_sharpness"):
            s["epsilon_sharpness"] = curvature.epsilon_sharpness(obj, self.epsilon, seed=self.seed).value
        if due("adaptive_sharpness"):
            s["adaptive_sharpness"] = curvature.adaptive_sharpness(obj, self.rho, "worst", seed=self.seed).value
        if due("average_adaptive_sharpness"):
            res = curvature.adaptive_sharpness(obj, self.rho, "average", seed=self.seed)
            s["average_adaptive_sharpness"] = res.value
        if due("sam_sharpness"):
            s["sam_sharpness"] = curvature.sam_sharpness(obj, self.rho).value
        if due("pac_bayes_sigma"):
            s["pac_bayes_sigma"] = curvature.pac_bayes_sigma(obj, self.pac_bayes_threshold, seed=self.seed).value
        return out

    @override
    def analyze(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        strategy = trainer.strategy
        with self.stage(trainer, "probe objective"):
            obj = self.objective(trainer, pl_module)
            lr, limit, batch_size = self._optimizer_settings(trainer)
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
            sharded = distributed.ShardedObjective(strategy, obj)
            with self.stage(trainer, "Hessian measures"):  # run() joins every collective before it raises
                out = sharded.run(lambda o: self._estimate(o, limit))
        scalars.update(out["scalars"])
        scalars["n_hvp"] = out["n_hvp"]
        scalars["measures_cut"] = len(out.get("cut", []))
        if out.get("cut"):
            self.reporter.event("cut", {"step": step, "cut": out["cut"], "why": "the trigger's budget ran out"})
        record = {"step": step, "epoch": trainer.current_epoch, **scalars}
        self.history.append(record)
        self._report(step, scalars, out, obj.metadata, limit)

    def _report(
        self, step: int, scalars: dict[str, float], out: dict[str, Any], meta: dict, limit: float | None
    ) -> None:
        rep = self.reporter
        rep.scalars({k: v for k, v in scalars.items() if math.isfinite(v)}, step)
        metadata = {**meta, **self.probe_metadata, "step": step, "tol": self.tol, "seed": self.seed}
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
