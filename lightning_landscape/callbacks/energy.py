"""EnergyLandscape: the global energy landscape around the training trajectory, built trigger by trigger.

Each trigger (every ``n`` steps or epochs, at fit end, or :meth:`run_now`) runs the stages of
:mod:`lightning_landscape.dynamics.pipeline`, each configured by one small dataclass:

1. **basin sampling** (``sampling``): replicas of SGD (or SGLD at ``temperature``) from the current point, at the
   training learning rate and batch size (constant ``lr/B``), on a fixed pool of training batches; never touching
   the module or the optimizer. Replicas are split over DDP ranks.
2. **minima** (``quench``): the current point and every replica's end are quenched (L-BFGS on the probe set, a
   relative gradient tolerance, or to the energy resolution) and added to a persistent
   :class:`~lightning_landscape.dynamics.MinimaDatabase`, deduplicated in function space (outputs on the probe set).
3. **basins** (``basins``, ``paths``): minima joined by a path whose lower barrier is below their merge level
   (default: the temperature of the replicas' noise along the line between them; ``basins.merge_barrier`` fixes
   one level for all) are one basin. A straight line joins what it can; minimum-energy paths
   (string or NEB, FIRE, climbing image) the rest, split over DDP ranks: the current minimum to the previous
   trigger's, each new minimum to its nearest ones in other basins, then the spanning tree's gaps.
4. **Markov state model** (``msm``) of this trigger's replicas: k-means, a reversible MSM at ``lag``, implied
   timescales, Chapman-Kolmogorov test, PCCA+ sets; then the **chain of all triggers** (every replica so far, a
   fraction ``sampling.restarts`` of them restarted from the previous trigger's ends or a TrajectoryRecorder's
   snapshots, the least-visited first, and the training path,
   recorded every ``sampling.record_every`` steps): the training path's metastable stages, and transition path
   theory from the initial weights' metastable set to the current weights' (pathways, rate, MFPT, the path atlas).
5. **disconnectivity graph** of the basins.

The work is done in that order, item by item, while the ``budget`` lasts (every rank follows rank 0's decision);
what was spent is logged. Outputs, in ``<run dir>/energy/`` and W&B: figures ``disconnectivity``,
``timescales``, ``paths``, ``free_energy``, ``path_atlas``; tables ``minima``, ``basins``, ``barriers`` (both
directions), ``metastable``, ``pathways``, ``stages``; scalars ``n_basins``, ``current_basin``, ``noise_level``,
``crossing_temperature`` (the median merge level of the pairs joined), ``merge_barrier`` (when fixed),
``barrier_previous`` (saddle loss minus the current minimum's loss), ``slowest_timescale`` (in optimizer steps),
``metastable_states``, ``n_minima``, ``chain_mfpt``, ``chain_connected``, ``chain_stages``,
``new_minima``, ``quenches_converged``, ``paths_converged``, ``linear_joins``, ``spent_passes``, ``spent_seconds``;
the minima database (with its basins) in ``minima/``, every replica as a trajectory store in
``excursions/step-<n>/`` and the training path's chain features in ``excursions/training-path.npz``.

Example::

    energy = EnergyLandscape(
        every_n_epochs=5,
        sampling=SamplingConfig(replicas=8, steps=100),  # or a dict: sampling={"replicas": 8, "steps": 100}
        budget=Budget(share=0.05, seconds=600),  # or a dict; or a number: the share
    )
    trainer = L.Trainer(callbacks=[TrajectoryRecorder(), energy], logger=WandbLogger())
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

from lightning_landscape import budget as clock
from lightning_landscape import distributed
from lightning_landscape.callbacks.base import LandscapeCallback, global_batch_size
from lightning_landscape.checks import as_config, check_float
from lightning_landscape.dynamics import (
    Excursions,
    MinimaDatabase,
    SparseProjection,
    TrajectoryStore,
    disconnectivity_figure,
    disconnectivity_tree,
)
from lightning_landscape.dynamics.excursions import saved_replicas, step_rule
from lightning_landscape.dynamics.pipeline import (
    BARRIER_COLUMNS,
    QUENCH_VECTORS,
    BasinConfig,
    BasinsResult,
    Budget,
    CrossingNoise,
    MarkovModel,
    Minimum,
    MSMConfig,
    PathConfig,
    QuenchConfig,
    SamplingConfig,
    add_minimum,
    barrier_rows,
    basins_of,
    chain_columns,
    chain_of,
    dips,
    energy_resolution,
    markov_model,
    minimum_path,
    not_robust,
    plan_joins,
    quench_point,
    record_path,
    restart_points,
    sample,
    training_stages,
    transition_summary,
)
from lightning_landscape.geometry.paths import PathResult
from lightning_landscape.guard import preserve_state
from lightning_landscape.objective import Objective, map_tensors
from lightning_landscape.params import ParameterLayout, weight_decay_of
from lightning_landscape.probe import ProbeSpec
from lightning_landscape.report.logged import Logged
from lightning_landscape.report.plots import free_energy_figure, path_atlas_figure, paths_figure, timescales_figure

if TYPE_CHECKING:
    import lightning.pytorch as pl


def _passes(objective: Objective) -> int:
    return objective.passes["forward"] + objective.passes["backward"]


def probe_accuracy(outputs: np.ndarray, batches: list[Any]) -> np.ndarray:
    """Accuracy of flattened probe outputs ``(..., N * C)`` against the probe batches' integer targets (their
    second tensor), or NaN when the batches carry no class labels."""
    targets = [b[1] for b in batches if isinstance(b, (list, tuple)) and len(b) > 1 and torch.is_tensor(b[1])]
    if len(targets) != len(batches) or targets[0].is_floating_point() or targets[0].ndim != 1:
        return np.full(outputs.shape[:-1], np.nan)
    labels = torch.cat(targets).cpu().numpy()
    n_classes = outputs.shape[-1] // len(labels)
    if n_classes < 2 or n_classes * len(labels) != outputs.shape[-1]:
        return np.full(outputs.shape[:-1], np.nan)
    predicted = outputs.reshape(*outputs.shape[:-1], len(labels), n_classes).argmax(-1)
    return (predicted == labels).mean(-1)


#: a trigger's least work, in gradients on the probe set: the current point's quench (about 40 gradients) and its
#: certificate (about 8 Hessian-vector products of about 3 gradients each)
LEAST_WORK = 64


def _map_style(trainer: pl.Trainer) -> bool:
    loader = trainer.train_dataloader
    dataset = getattr(loader, "dataset", None)
    return hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")


def _sgd_rule(trainer: pl.Trainer) -> tuple[float, float] | None:
    """``(lr, momentum)`` of training's step when it is a replica's: one ``torch.optim.SGD`` whose parameter groups
    share one lr and heavy-ball momentum, without dampening or Nesterov; None otherwise (Adam, several optimizers)."""
    if len(trainer.optimizers) != 1 or type(trainer.optimizers[0]) is not torch.optim.SGD:
        return None
    rules = {(float(g["lr"]), float(g["momentum"])) for g in trainer.optimizers[0].param_groups if g["params"]}
    plain = all(not g["nesterov"] and not g["dampening"] for g in trainer.optimizers[0].param_groups)
    return rules.pop() if len(rules) == 1 and plain else None


class EnergyLandscape(LandscapeCallback):
    """Basin sampling, quenched minima joined into basins, minimum-energy paths, a Markov state model and the
    disconnectivity graph of the basins, every trigger.

    Each stage is configured by one small dataclass of :mod:`lightning_landscape.dynamics.pipeline` (or a dict of
    its fields; in YAML a nested mapping), whose defaults work without tuning.

    Args:
        every_n_steps: run every ``n`` optimizer steps (and :meth:`run_now` on demand).
        every_n_epochs: run at the end of every ``n``-th epoch.
        at_fit_end: run when training ends.
        sampling: :class:`~lightning_landscape.dynamics.SamplingConfig`: replicas, their steps, ``lr`` (default:
            training's), SGLD ``temperature``, recording, the minibatch pool, seeds and the sketch. With a
            :class:`TrajectoryRecorder` in the trainer, its projection sketches the replicas too.
        quench: :class:`~lightning_landscape.dynamics.QuenchConfig`: L-BFGS iterations, relative tolerance and the
            function-space dedup of minima.
        basins: :class:`~lightning_landscape.dynamics.BasinConfig`: ``merge_barrier`` (default: each pair's noise
            along its barrier, ``T + lr s_d / (2 (1 - beta))``, see :mod:`~lightning_landscape.dynamics.pipeline`).
        paths: :class:`~lightning_landscape.dynamics.PathConfig`: images, FIRE iterations, method and ``max_paths``.
        msm: :class:`~lightning_landscape.dynamics.MSMConfig`: lag, states, features and PCCA+ sets.
        budget: :class:`~lightning_landscape.budget.Budget`: the share of training time the triggers may take
            (default 5%, at least 10 s a trigger), a cap in seconds and in batch passes per trigger.
        weight_decay: the L2 coefficient of the energy, ``E(theta) = L(theta) + weight_decay |theta|^2 / 2``, which the
            replicas sample and the quenches and paths descend. ``None`` (default): the training optimizers' own,
            per parameter group (:func:`~lightning_landscape.params.weight_decay_of`), read at every trigger, so the
            replicas see the energy that training descends. A cross-entropy loss on a probe set that the network can
            fit has no minimum at finite weights without it: its quenches run off without converging.
        probe: the probe set and the energy (:class:`~lightning_landscape.probe.ProbeSpec` or a dict of its fields), as
            for every callback, with these defaults: the whole probe set in one batch (fewer, larger passes) where a
            Hessian-vector product on it fits in a quarter of the free memory, else the largest batch that does
            (measured at the start of training, warned about and recorded as ``probe_batch_size``), and
            ``bn_mode="train"``: BatchNorm normalizes with the statistics of the probe batch, so the energy is a
            function of the weights alone and a minimum has the same loss at every trigger (``"eval"``, the running
            statistics, is refused for modules with BatchNorm, whose running statistics move between triggers).
            ``probe.outputs_fn(module, batch) -> tensor`` gives the network's outputs on a probe batch (the
            function-space fingerprint of minima and the ``"outputs"`` features); default ``module(first tensor of
            the batch)``. With an iterable training dataset, the given ``probe.batches`` are also the replicas'
            minibatch pool.
        progress: show a progress bar (rank 0).
        key_prefix: keys are ``<key_prefix>-energy/<name>``.

    Raises:
        ValueError: for a bad value in any stage's config (named as ``stage.field``), or a stage given as something
            else than its config or a dict of its fields.
    """

    default_share = 0.05  # of training time (the floor: 10 s a trigger)
    counts_passes = True
    name = "energy"
    #: what it logs (the dashboard's panels); ``seconds_<stage>`` per stage
    logged = Logged(
        scalars=(
            "n_minima",
            "new_minima",
            "n_basins",
            "current_basin",
            "merge_barrier",
            "noise_level",
            "crossing_temperature",
            "barrier_previous",
            "slowest_timescale",
            "metastable_states",
            "spent_passes",
            "spent_seconds",
            "seconds_*",
            "replicas_run",
            "quenches_run",
            "quenches_converged",
            "quenches_stationary",
            "quench_loss_drop",
            "quench_grads",
            "quenches_certified",
            "saddles_kicked",
            "certificate_hvps",
            "minima_certified",
            "minima_refined",
            "linear_joins",
            "paths_run",
            "paths_converged",
            "path_grads",
            "chain_points",
            "chain_connected",
            "chain_restarts",
            "chain_restarts_snapshots",
            "chain_sets",
            "chain_sets_robust",
            "chain_transition_agreement",
            "chain_metastable",
            "chain_stages",
            "chain_mfpt",
            "chain_rate",
            "seconds",
            "budget_seconds",
            "skipped",
            "failures",
        ),
        media=("disconnectivity", "paths", "timescales", "free_energy", "path_atlas"),
        tables=("minima", "basins", "barriers", "metastable", "pathways", "stages"),
    )
    shard_probe = False  # every rank holds the whole probe set; replicas, quenches and paths are split instead
    default_bn_mode = "train"  # the energy of the weights alone (see `probe`)

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        at_fit_end: bool = True,
        sampling: SamplingConfig | None = None,
        quench: QuenchConfig | None = None,
        basins: BasinConfig | None = None,
        paths: PathConfig | None = None,
        msm: MSMConfig | None = None,
        budget: Budget | float | dict | str | None = "default",
        weight_decay: float | None = None,
        probe: ProbeSpec | dict | None = None,
        progress: bool = True,
        key_prefix: str = "landscape",
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
        self.sampling: SamplingConfig = as_config(SamplingConfig, sampling, "sampling")
        self.quench: QuenchConfig = as_config(QuenchConfig, quench, "quench")
        self.basins: BasinConfig = as_config(BasinConfig, basins, "basins")
        self.paths: PathConfig = as_config(PathConfig, paths, "paths")
        self.msm: MSMConfig = as_config(MSMConfig, msm, "msm")
        points = self.sampling.steps // self.sampling.record_every + 1  # recorded points per replica
        if 2 * self.msm.lag >= points:
            message = (
                f"`msm.lag` ({self.msm.lag}) needs replicas of more than {2 * self.msm.lag} recorded points, and each"
                f" records {points} (`sampling.steps` {self.sampling.steps} / `sampling.record_every`"
                f" {self.sampling.record_every} + 1): no chain can be fitted. HINT: `msm.lag` below"
                f" {max(1, (points - 1) // 2)}, or more `sampling.steps`."
            )
            if msm is not None:  # a chain asked for that cannot work
                raise ValueError(message)
            warnings.warn(f"EnergyLandscape: {message} Minima, basins and paths are still computed.", stacklevel=2)
        check_float("weight_decay", weight_decay, strict=False, optional=True, hint="None takes the optimizer's.")
        self.weight_decay = weight_decay
        self.reset()

    @override
    def reset(self) -> None:
        super().reset()
        self.previous_minimum: int | None = None
        self.minima_dir: str | None = None  # kept in checkpoints: a resumed run continues the same database
        self.minima_names: list[str] | None = None  # the parameters its minima are vectors of
        self._resumed = False
        self.history: list[dict[str, Any]] = []
        self._pool: list[Any] | None = None
        self._warned_quenches = False
        self._warned_chain = False
        self._warned_rules = False
        self._candidates: list[torch.Tensor] = []  # the last trigger's replica ends: where restarts may start
        self._candidate_keys: list[tuple[int, int]] = []  # (step, replica) of each
        self._visits: list[float] = []  # rank 0: the chain's points in each candidate's state
        self._path_visits: dict[int, float] = {}  # rank 0: the chain's points in the state of each path point's step
        # rank 0: the training path in the chain's features, every `sampling.record_every` optimizer steps from the
        # initial weights (step 0) on; with its probe accuracy
        self._path_steps: list[int] = []
        self._path_rules: list[tuple[float, float] | None] = []  # training's step rule (_sgd_rule) at each point
        self._path_features: list[np.ndarray] = []
        self._path_accuracy: list[float] = []
        self._path_failed = False
        self._columns: np.ndarray | None = None  # the output coordinates that are the chain's features
        #: the training path's metastable stages in the last chain: ``{"set", "first_step", "last_step", "points"}``
        self.chain_stages: list[dict[str, int]] = []
        #: the last trigger's transition in the chain of all triggers (sets, MFPT, pathways), or ``{"none": why}``
        self.chain_transition: dict[str, Any] = {}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self.plan_memory(ParameterLayout.from_module(pl_module).numel, pl_module.device)
        if (
            stage == "fit"
            and self.probe.bn_mode == "eval"
            and any(isinstance(m, _BatchNorm) for m in pl_module.modules())
        ):
            raise ValueError(
                f"`probe.bn_mode='eval'` on {type(pl_module).__name__}, which has BatchNorm layers: their running"
                " statistics move between triggers, so a stored minimum would have another loss at the next trigger"
                " and barriers between triggers would be artifacts. HINT: use `probe.bn_mode='train'` (the default),"
                " where the energy is a function of the weights alone."
            )

    def plan_memory(self, n_params: int, device: torch.device) -> None:
        """Before training, the least a trigger holds must fit on the device (refused with sizes and a fix
        otherwise): one replica per rank (its point, velocity, gradient and the start: 4 vectors of ``P`` entries),
        a quench with its certificate (L-BFGS's 10 pairs and a Lanczos basis of 12: 34 vectors, float64 with
        ``quench.dtype="float64"``; ``"auto"`` quenches in float32 when float64 would not fit),
        and a minimum-energy path (positions, velocities and forces of ``paths.images`` images). The replica rounds
        then grow only as far as the budget allows."""
        from lightning_landscape.curvature.memory import check_vectors

        name = f"EnergyLandscape on {n_params:,} parameters"
        check_vectors(
            4 + 3 * self.paths.images,
            n_params,
            self.probe.dtype,
            device,
            f"{name} (a path of {self.paths.images} images)",
            "fewer `paths.images`, or `paths.max_paths=0` to join minima by straight lines.",
        )
        float64 = self.quench.dtype == "float64" or self.probe.dtype == torch.float64  # "auto" falls back to float32
        dtype = torch.float64 if float64 else torch.float32
        check_vectors(
            QUENCH_VECTORS,
            n_params,
            dtype,
            device,
            f"{name} (a certified {str(dtype).removeprefix('torch.')} quench)",
            "quench.dtype='auto' (float32 when float64 does not fit), a smaller model, or one with fewer trainable"
            " parameters (freeze a part)."
            if float64
            else "a smaller model, or fewer trainable parameters.",
        )

    def _plan_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The probe set's size and batch size, measured once at the start of training on a sample batch (rank 0
        decides for every rank; both are recorded and kept for the fit, so every trigger measures one energy):

        * size: cut, with a warning, where a trigger's least work (:data:`LEAST_WORK` gradients' worth: a certified
          quench of the current point) on the whole probe set would not fit in the budget's floor (or its seconds),
          down to two training batches at least; a model that cannot do even that in time is warned about;
        * batch size, when none is given: the whole set in one batch (fewer, larger passes) when a Hessian-vector
          product on it fits in a quarter of the free memory (in float64 when the quench may take it), else the
          largest batch that does (:func:`~lightning_landscape.curvature.memory.graph_bytes`)."""
        from lightning_landscape.curvature.memory import HVP_GRAPH_FACTOR, free_bytes, graph_bytes

        spec, size, budget = self.probe, self.probe.size, self.budget
        # the seconds any trigger may take: the floor of a share, the cap without one, no limit without either
        allowed = budget.floor if budget.share is not None else budget.seconds or math.inf
        decision: tuple[int, int, float] | str = (size, spec.batch_size or size, 0.0)
        if trainer.is_global_zero:
            try:
                n = min(size, 32)
                sample = self.draw_batches(trainer, n, n, spec.seed, sharded=False)
                objective = Objective(pl_module, sample, spec.loss_fn, bn_mode=spec.bn_mode, dtype=spec.dtype)
                warm = [map_tensors(sample[0], lambda t: t[:2])]  # the first call's one-off costs, on two samples
                graph_bytes(Objective(pl_module, warm, spec.loss_fn, bn_mode=spec.bn_mode, dtype=spec.dtype))
                start = time.perf_counter()
                per_sample = graph_bytes(objective) / n
                seconds = (time.perf_counter() - start) / n  # a gradient, per sample (an overestimate: small batch)
                wide = 2 if self.quench.dtype != "float32" and spec.dtype == torch.float32 else 1  # a float64 quench
                least = LEAST_WORK * wide * seconds  # seconds of a trigger's least work, per probe sample
                if least * size > allowed:
                    smallest = min(size, 2 * (getattr(trainer.train_dataloader, "batch_size", None) or 16))
                    size = max(smallest, int(allowed / least))
                batch = spec.batch_size or size
                fit = int(0.25 * free_bytes(pl_module.device) // max(HVP_GRAPH_FACTOR * wide * per_sample, 1.0))
                if spec.batch_size is None and fit < size:
                    batch = max(2, fit)
                    while size % batch == 1 and batch > 2:  # no batch of one sample (BatchNorm in train mode)
                        batch -= 1
                decision = (size, batch, least * size)
            except Exception as err:  # the loss itself fails: the check that follows says why, with a hint
                decision = f"{type(err).__name__}: {err}"
        decision = distributed.broadcast(trainer.strategy, decision)
        if isinstance(decision, str):
            decision = (spec.size, spec.batch_size or spec.size, 0.0)
        size, batch, least = decision
        if trainer.is_global_zero and size < spec.size:
            overrun = (
                f" Even so it takes about {least:.0f} s, more than the {allowed:g} s a trigger may take: triggers"
                " will run over their budget by that."
                if least > allowed
                else ""
            )
            warnings.warn(
                f"EnergyLandscape: a trigger's least work (a certified quench of the current point, about {LEAST_WORK}"
                f" gradients' worth) on {spec.size} probe samples would not fit in its budget on this model, so the"
                f" probe set is cut to {size} samples for this fit (recorded as `probe_size`).{overrun} HINT: set"
                " `budget={'floor': ...}` (seconds a trigger may always take) to keep a larger probe set, or run on an"
                " accelerator.",
                UserWarning,
                stacklevel=2,
            )
        if trainer.is_global_zero and spec.batch_size is None and batch < size:
            warnings.warn(
                f"EnergyLandscape: a Hessian-vector product on the {size} probe samples in one batch would not fit in"
                f" a quarter of the free memory of {pl_module.device}, so the probe set is evaluated in batches of"
                f" {batch} (recorded as `probe_batch_size`; with BatchNorm in train mode the batch defines the"
                " energy). HINT: set `probe.batch_size` to choose it.",
                UserWarning,
                stacklevel=2,
            )
        self.probe = replace(self.probe, size=size, batch_size=batch)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._resumed and trainer.is_global_zero:
            self._carry_minima(trainer.global_step)
        self._resumed = False
        self._record_path(trainer, pl_module, always=True)  # the chain's start (a resumed run: where it resumes)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._record_path(trainer, pl_module)  # before a trigger at this step, which starts from this point
        super().on_train_batch_end(trainer, pl_module, *args)

    def _record_path(self, trainer: pl.Trainer, pl_module: pl.LightningModule, always: bool = False) -> None:
        """Rank 0: the training path's point at this optimizer step, every ``sampling.record_every`` steps (with
        ``sampling.training_path``; ``always``: now): the outputs on the probe set at the chain's coordinates, and
        the probe accuracy. One forward pass of the probe set, with the module's state and the RNG streams restored;
        a failure warns once and stops the recording, never the training."""
        step = trainer.global_step
        if not trainer.is_global_zero or self._path_failed or trainer.sanity_checking or trainer.fast_dev_run:
            return
        due = self.sampling.training_path and step % self.sampling.record_every == 0
        if not (always or due) or (self._path_steps and self._path_steps[-1] == step):
            return
        try:
            with preserve_state(pl_module, ()), torch.inference_mode(False):
                probe = self.objective(trainer, pl_module) if self._stale(pl_module) else self._objective
                outputs = probe.outputs(probe.theta0).reshape(1, -1).double().cpu().numpy()
            if self._columns is None:
                self._columns = chain_columns(outputs.shape[1], self.sampling.seed)
            self._path_features.append(outputs[0, self._columns].astype(np.float32))
            self._path_accuracy.append(float(probe_accuracy(outputs, probe.batches)[0]))
            self._path_rules.append(_sgd_rule(trainer))
            self._path_steps.append(step)
        except Exception as err:
            self._path_failed = True
            self._part_failed(
                step,
                "training path",
                "record the training path",
                err,
                "the chain of all triggers goes on without it. Training is not affected.",
            )

    def _part_failed(self, step: int, stage: str, action: str, err: BaseException, standing: str) -> None:
        """A part of the analysis failed and the rest stands: warn (what still stands, what to do) and record it in
        the run's ``failures`` events under ``stage``."""
        message = f"{type(err).__name__}: {err}"
        warnings.warn(
            f"lightning-landscape: EnergyLandscape could not {action} at step {step} ({message}); {standing}",
            RuntimeWarning,
            stacklevel=3,
        )
        self.reporter.event("failures", {"step": step, "stage": stage, "error": message})

    def _carry_minima(self, step: int) -> None:
        """A resumed run continues the checkpoint's minima database in its own folder, rolled back to the
        checkpoint's step (minima and visits of the abandoned timeline are dropped); the checkpoint's folder is
        only read, unless it is this run's own."""
        source = Path(self.minima_dir) if self.minima_dir else None
        target = self.reporter.run_dir / "minima"
        if source is None or not (source / "minima.json").exists():
            self.minima_dir, self.previous_minimum = None, None
            return
        if source.resolve() != target.resolve():
            if target.exists():
                target = target.with_name(f"minima-resumed-step{step}")
            MinimaDatabase(source).copy_to(target)
        db = MinimaDatabase(target)
        db.rollback(step)
        self.minima_dir = str(target)
        if self.previous_minimum is not None and self.previous_minimum >= len(db):
            self.previous_minimum = None

    @override
    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.probe.batches is None and self._probe_batches is None:
            self._plan_probe(trainer, pl_module)
        super().check(trainer, pl_module)
        objective = self.objective(trainer, pl_module)
        source = (
            "`probe.outputs_fn`" if self.probe.outputs_fn is not None else f"`{type(pl_module).__name__}(batch[0])`"
        )
        try:
            outputs = objective.outputs()
            if not torch.is_tensor(outputs) or not outputs.is_floating_point():
                raise TypeError(f"got {type(outputs).__name__} {getattr(outputs, 'dtype', '')}, not a floating tensor")
        except Exception as err:
            raise RuntimeError(
                f"EnergyLandscape cannot compute the network's outputs on a probe batch ({source}), which fingerprint"
                f" minima in function space: {type(err).__name__}: {err}. HINT: pass"
                " `EnergyLandscape(probe={'outputs_fn': lambda module, batch: ...})` returning the outputs as a"
                " floating tensor, e.g. `module(batch['input_ids'])` for dict batches or `module.encoder(batch[0])`"
                " for an autoencoder."
            ) from err

    # ------------------------------------------------------------------ budget
    def _passes(self, trainer: pl.Trainer, spend: list[tuple[Objective, int]]) -> int:
        """Batch passes spent this trigger by each objective since its mark, summed over ranks (a collective)."""
        local = sum(_passes(o) - mark for o, mark in spend)
        return int(distributed.reduce_sum(trainer.strategy, torch.tensor(float(local))).item())

    def _may_continue(self, trainer: pl.Trainer, spend: list[tuple[Objective, int]]) -> bool:
        """Rank 0's decision, on every rank: is any budget left?"""
        passes = self._passes(trainer, spend)
        left = (self.budget.passes is None or passes < self.budget.passes) and self.time_left() > 0
        return bool(distributed.broadcast(trainer.strategy, left))

    # ------------------------------------------------------------------ the analysis
    @override
    def stages(self) -> int:
        return 6

    def _projection(self, trainer: pl.Trainer, pl_module: pl.LightningModule, x0: torch.Tensor) -> SparseProjection:
        """The recorder's projection when a TrajectoryRecorder runs (one basis for trajectories and replicas): it
        projects all parameters, so the replicas' trainable ones are sketched with the frozen ones held fixed."""
        from lightning_landscape.callbacks.trajectory import TrajectoryRecorder

        recorder = TrajectoryRecorder.find(trainer)
        if recorder is None:
            return SparseProjection(x0.numel(), self.sampling.sketch_dim, self.sampling.projection_seed, 1, x0.device)
        everything = ParameterLayout.from_module(pl_module, trainable_only=False)
        full = SparseProjection(
            everything.numel, recorder.sketch_dim, recorder.projection_seed, recorder.sketch_nnz, x0.device
        )
        trainable = [everything.slices()[n] for n in ParameterLayout.from_module(pl_module).names]
        positions = torch.cat([torch.arange(s.start, s.stop) for s in trainable]).to(x0.device)
        flat = torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()]).to(x0)
        return full.restricted(positions, flat)

    @override
    def advance(self, stage: str) -> None:
        now = time.perf_counter()
        self._timings[f"seconds_{stage.replace(' ', '_').lower()}"] = now - self._mark
        self._mark = now
        super().advance(stage)

    def _pool_objective(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Objective:
        batch_size = global_batch_size(trainer) or 32
        if self._pool is None and self.probe.batches is not None and not _map_style(trainer):
            self._pool = self.probe_set(trainer)  # nothing to draw from: the given batches are the pool
        if self._pool is None:
            self._pool = self.draw_batches(
                trainer, batch_size * self.sampling.pool_batches, batch_size, self.sampling.seed + 1, sharded=False
            )
        spec = self.probe
        return Objective(pl_module, self._pool, spec.loss_fn, bn_mode=spec.bn_mode, dtype=spec.dtype)

    def _rounds(self, trainer: pl.Trainer, n: int, stage: str, work: Any, go_on: Any) -> list[Any]:
        """``work(i)`` for ``i < n``, one item per rank per round, while ``go_on(first item of the round)`` (the same
        decision on every rank); every result, in order, on every rank."""
        rank, world_size = distributed.world(trainer.strategy)
        results: list[Any] = []
        for first in range(0, n, world_size):
            if not go_on(first):
                break
            mine = None
            with self.stage(trainer, stage):
                if first + rank < n:
                    mine = work(first + rank)
            results += [r for r in distributed.gather_objects(trainer.strategy, mine) if r is not None]
        return results

    def _replica_rounds(self, trainer: pl.Trainer, spend: list, run: Any) -> list[Excursions]:
        """The replicas in rounds while the budget lasts, each rank running its share of a round together
        (:func:`sample_basin` steps them in one vmapped call): one replica per rank first, then as many per rank as
        the budget left is estimated to allow from what the first cost (all the rest, without a budget). The
        replicas may take half of the trigger's time left (the quenches, certificates and paths need the rest): a
        round stops its replicas together at that deadline, with the points recorded so far."""
        rank, world = distributed.world(trainer.strategy)
        total, done, per_rank, results = self.sampling.replicas, 0, 1, []
        end = time.perf_counter() + 0.5 * self.time_left()  # rank 0's is the one that decides

        def stage_left() -> float:
            return end - time.perf_counter() if math.isfinite(end) else math.inf

        while done < total and self._may_continue(trainer, spend):
            if not distributed.broadcast(trainer.strategy, done == 0 or stage_left() > 0):
                break
            ids = list(range(done, min(total, done + per_rank * world)))
            began, passes = time.perf_counter(), self._passes(trainer, spend)
            mine = None
            with self.stage(trainer, "basin sampling"), clock.deadline(stage_left(), trainer):
                if ids[rank::world]:
                    mine = run(ids[rank::world])
            results += [r for r in distributed.gather_objects(trainer.strategy, mine) if r is not None]
            done += len(ids)
            affordable = float(total - done)  # replicas the budget left allows, at the cost of this round's
            seconds, spent = (
                (time.perf_counter() - began) / len(ids),
                (self._passes(trainer, spend) - passes) / len(ids),
            )
            if math.isfinite(stage_left()):
                affordable = min(affordable, stage_left() / max(seconds, 1e-9))
            if self.budget.passes is not None:
                affordable = min(affordable, (self.budget.passes - self._passes(trainer, spend)) / max(spent, 1.0))
            per_rank = int(distributed.broadcast(trainer.strategy, max(1, int(affordable // world))))
        return results

    @override
    def analyze(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        # anytime inside a rank's own work items (quenches and their certificates stop at the deadline, stored
        # uncertified); the decisions between items are rank 0's (_may_continue)
        with clock.deadline(self.time_left(), trainer):
            self._analyze(trainer, pl_module, step)

    def _analyze(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        start = self._mark = time.perf_counter()
        self._timings: dict[str, float] = {}
        strategy = trainer.strategy
        with self.stage(trainer, "objectives"):
            probe = self.objective(trainer, pl_module)
            pool = self._pool_objective(trainer, pl_module)
            spend = [(probe, _passes(probe)), (pool, _passes(pool))]
            lr, momentum = self._replica_rule(trainer)
            l2 = self.weight_decay if self.weight_decay is not None else weight_decay_of(trainer.optimizers, pl_module)
            probe.set_l2(l2)
            pool.set_l2(l2)
            x0 = probe.theta0
            sketch = self._projection(trainer, pl_module, x0)

        def budget_left(first: int) -> bool:
            return self._may_continue(trainer, spend)

        # 1. basin sampling: some replicas from earlier points (previous ends, the recorder's snapshots; least-visited
        # first), the rest from x0
        restarts: dict[int, Any] = {}
        if self.sampling.restarts > 0:  # the same on every rank: a collective follows
            with self.stage(trainer, "basin sampling"):
                if trainer.is_global_zero:
                    restarts = self._restarts(trainer, pl_module, step)
            restarts = distributed.broadcast(strategy, restarts)
        # where each restarted replica starts: [replica, step, replica there (-1: the recorder's snapshot)]
        restarted_from = [
            [k, *map(int, self._candidate_keys[o] if isinstance(o, int) else (o[0], -1))]
            for k, o in sorted(restarts.items())
        ]
        starts = None
        if restarts:
            starts = x0.detach().cpu().expand(self.sampling.replicas, -1).clone()
            for replica, origin in restarts.items():
                point = self._candidates[origin] if isinstance(origin, int) else torch.from_numpy(origin[1])
                starts[replica] = point.to(starts.dtype)

        def replicas(ids: list[int]) -> Excursions:
            run = sample(
                pool,
                x0,
                self.sampling,
                lr,
                replicas=ids,
                seed_offset=step,
                sketch=sketch,
                probe=probe,
                starts=starts,
                momentum=momentum,
            )
            run.finals = run.finals.cpu()  # gathered between ranks: no device indices
            return run

        runs = self._replica_rounds(trainer, spend, replicas)
        with self.stage(trainer, "basin sampling"):
            excursions = Excursions.concatenate(runs) if runs else replicas([])
            # this trigger's ends, on every rank (gathered): where the next trigger's restarts may start
            self._candidates = [excursions.finals[i] for i in range(len(excursions.replica_ids))]
            self._candidate_keys = [(step, int(r)) for r in excursions.replica_ids]
            self._visits = [float("nan")] * len(self._candidates)  # rank 0 counts them in the chain
            if trainer.is_global_zero and len(excursions.replica_ids):
                layout = {"names": list(probe.layout.names), "shapes": [list(s) for s in probe.layout.shapes]}
                store_meta = {"k": sketch.k, "projection_seed": sketch.seed, "nnz": sketch.nnz, "step": step, **layout}
                excursions.save(self.reporter.run_dir / "excursions" / f"step-{step:09d}", store_meta)
        self.advance("basin sampling")

        # 2. quench the current point (always) and the replicas' ends, to a tenth of the fixed merge level or of the
        # noise level; without a fixed level, each pair of minima merges at the noise along it (rank 0 measures it)
        fixed, noise, level = self.basins.merge_barrier, None, self.basins.merge_barrier
        with self.stage(trainer, "minima"):
            candidates = torch.cat([x0[None].cpu(), excursions.finals.to(x0.dtype)])
            if fixed is None and trainer.is_global_zero:
                noise = CrossingNoise.measure(pool, x0, lr, self.sampling.temperature, momentum)
                level = noise.level
        level = float(distributed.broadcast(strategy, level))
        quenched = self._rounds(
            trainer,
            len(candidates),
            "minima",
            lambda i: quench_point(probe, candidates[i].to(x0), self.quench, level),
            lambda first: first == 0 or self._may_continue(trainer, spend),
        )
        self.advance("minima")

        # 3. the database, basins and the paths that join them (rank 0 plans, whole paths split over ranks)
        plan, new_minima, current, db, linear_joins, joins = None, 0, None, None, 0, None
        with self.stage(trainer, "minima database"):
            if trainer.is_global_zero:
                db, current, new_minima, joins = self._database(probe, quenched, excursions, step, noise)
                linear_joins = len(joins.linear)
                plan = [(i, j, torch.from_numpy(db.theta(i)), torch.from_numpy(db.theta(j))) for i, j in joins.paths]
        plan = distributed.broadcast(strategy, plan)

        def path(k: int) -> tuple[int, int, PathResult]:
            i, j, a, b = plan[k]
            return i, j, minimum_path(probe, a.to(x0), b.to(x0), self.paths, level)

        found_paths = self._rounds(trainer, len(plan), "paths", path, budget_left)
        self.advance("paths")
        passes = self._passes(trainer, spend)
        if not trainer.is_global_zero:
            return
        local_mark = _passes(probe)
        scalars: dict[str, float] = {"new_minima": new_minima}
        dipped = []
        for i, j, found in found_paths:
            record_path(db, i, j, found, step=step, merge_level=joins.levels[(i, j)])
            # a dip along the path deeper than the merge level: quench it, it may be a new minimum
            for theta in [found.images[k] for k in dips(found.losses, joins.levels[(i, j)])[:2]]:
                try:
                    point = quench_point(probe, theta, self.quench, level, step=step, source=f"path {i}-{j}")
                    k, new = self._add_minimum(db, probe, point)
                except ValueError:  # not finite
                    continue
                scalars["new_minima"] += new
                dipped.append(k)
        if dipped:  # join them to the others by straight lines; their paths wait for the next trigger
            no_paths = replace(self.paths, max_paths=0)
            more = plan_joins(
                db, probe, dipped, fixed, self.basins, no_paths, noise=noise, quench=self.quench, step=step
            )
            linear_joins += len(more.linear)
        basins = basins_of(db, fixed)
        self._check_quenches(quenched, level, probe, step)
        passes += _passes(probe) - local_mark
        if self.previous_minimum is not None and current is not None and current != self.previous_minimum:
            saddle = db.saddles.get((min(current, self.previous_minimum), max(current, self.previous_minimum)))
            if saddle is not None:
                scalars["barrier_previous"] = saddle["saddle"] - db.records[current]["loss"]
        self.previous_minimum = current
        self.advance("basins")
        try:
            msm = self._markov_state_model(excursions, scalars)
        except Exception as err:  # too little or disconnected data: the rest of the trigger still stands
            msm = None
            self._part_failed(
                step,
                "markov state model",
                "fit the Markov state model",
                err,
                "minima, basins and graph are still reported. HINT: raise `sampling.replicas` or `sampling.steps`.",
            )
        try:
            self._chain(trainer, step, excursions, probe, scalars, restarts)
        except Exception as err:  # the chain is a view over all triggers: this trigger still stands
            self._part_failed(
                step, "chain", "fit the chain of all triggers", err, "this trigger's results are still reported."
            )
        self.advance("Markov state model")
        tree = None
        if basins.n_basins > 1:
            tree = disconnectivity_tree([r["loss"] for r in basins.rows], basins.saddles)
        elif len(joined := np.flatnonzero(np.isfinite(saddles := db.saddle_matrix()).sum(1) > 1)):  # one basin
            tree = disconnectivity_tree(db.losses[joined], saddles[np.ix_(joined, joined)], joined)
        self.advance("disconnectivity graph")
        scalars.update(self._timings)
        scalars.update(
            n_minima=len(db),
            n_basins=basins.n_basins,
            current_basin=int(basins.labels[current]) if current is not None else -1,
            noise_level=level,
            spent_passes=passes,
            spent_seconds=time.perf_counter() - start,
            replicas_run=len(excursions.replica_ids),
            quenches_run=len(quenched),
            quenches_converged=sum(q.converged for q in quenched),
            quenches_stationary=sum(q.criterion == "gradient" for q in quenched),
            quench_loss_drop=float(np.median([q.loss_drop for q in quenched])) if quenched else float("nan"),
            quench_grads=sum(q.n_grad_total for q in quenched),
            # a quenched point is certified when it is a minimum, or a saddle whose kicked sides all are
            quenches_certified=sum(all(k.certified for k in q.kicked) if q.kicked else q.certified for q in quenched),
            saddles_kicked=sum(bool(q.kicked) for q in quenched),
            certificate_hvps=sum(q.n_hvp for q in quenched),
            minima_refined=len(joins.refined) + (len(more.refined) if dipped else 0),
            minima_certified=sum(db.certified),
            linear_joins=linear_joins,
            paths_run=len(found_paths),
            paths_converged=sum(p.converged for _, _, p in found_paths),
            path_grads=sum(p.n_grad for _, _, p in found_paths),
        )
        if self.basins.merge_barrier is not None:
            scalars["merge_barrier"] = self.basins.merge_barrier
        if joins is not None and joins.levels:  # the noise along the pairs looked at (or the fixed level)
            scalars["crossing_temperature"] = float(np.median(list(joins.levels.values())))
        self.history.append({"step": step, **scalars})
        self.history[-1]["restarted_from"] = restarted_from
        self._report(step, db, basins, found_paths, msm, tree, scalars, probe.metadata)

    def _check_quenches(self, quenched: list[Minimum], level: float, probe: Objective, step: int) -> None:
        """Warn once per run when most quenches do not converge: the minima, basins and barriers are then upper
        bounds, and the warning says why it likely is so and what to change."""
        if self._warned_quenches or not quenched or sum(q.converged for q in quenched) * 2 >= len(quenched):
            return
        self._warned_quenches = True
        drop = float(np.median([q.loss_drop for q in quenched]))
        ratio = float(np.median([q.grad_ratio for q in quenched]))
        ftol = energy_resolution(self.quench.ftol, level)
        without_l2 = not isinstance(probe.l2, torch.Tensor) and probe.l2 == 0
        why = (
            " Without weight decay, a cross-entropy loss on a probe set the network can fit has no minimum at finite"
            " weights: quenches run off towards |theta| -> infinity."
            if without_l2
            else ""
        )
        warnings.warn(
            f"lightning-landscape: EnergyLandscape at step {step}: {len(quenched) - sum(q.converged for q in quenched)}"
            f" of {len(quenched)} quenches did not converge in quench.max_iter={self.quench.max_iter} iterations"
            f" (median gradient ratio {ratio:.2g}, against quench.rtol={self.quench.rtol:g}; the loss still falling"
            f" by more than the energy resolution {ftol:.3g} per 20 iterations); they lowered the loss"
            f" by a median {drop:.3g}. The replicas end far above the minima of the probe loss, so minima, barriers"
            f" and basins are upper bounds.{why}"
            " HINT: train with weight decay (or set `weight_decay=`), raise `quench.max_iter`, or take a larger"
            " `probe.size` (harder to fit).",
            RuntimeWarning,
            stacklevel=2,
        )

    def _database(
        self, probe: Objective, quenched: list[Minimum], excursions: Excursions, step: int, noise: CrossingNoise | None
    ):
        """Rank 0: the quenched points into the minima database, the straight-line joins, and the paths to compute:
        ``(database, current minimum, new minima, joining plan)``."""
        new_minima, current = 0, None
        meta = {**probe.metadata, **self.probe_metadata}
        names = list(probe.layout.names)
        exists = self.minima_dir is not None and Path(self.minima_dir).exists()
        changed = self.minima_names not in (None, names)
        changed = changed or (exists and MinimaDatabase(self.minima_dir).meta.get("l2", 0.0) != meta["l2"])
        if changed and exists:
            warnings.warn(
                f"lightning-landscape: the trainable parameters or the weight decay changed before step {step} (e.g."
                " layers unfrozen); EnergyLandscape starts a new minima database, since minima of another parameter"
                " space or energy cannot be compared with the old ones.",
                RuntimeWarning,
                stacklevel=2,
            )
            self.minima_dir = None
        if self.minima_dir is None or not Path(self.minima_dir).exists():
            folder = self.reporter.run_dir / "minima"
            self.minima_dir = str(folder if not folder.exists() else folder.with_name(f"minima-step{step}"))
            self.previous_minimum = None
        self.minima_names = names
        db = MinimaDatabase(self.minima_dir, tol=self.quench.dedup_tol, meta=meta)
        rejected, found = [], []
        for index, point in enumerate(quenched):
            source = "training" if index == 0 else f"replica {excursions.replica_ids[index - 1]}"
            try:
                i, new = self._add_minimum(db, probe, point, step=step, source=source)
            except ValueError:  # not finite: a diverged replica is no minimum
                rejected.append(source)
                continue
            new_minima += new
            found.append(i)
            current = i if index == 0 else current
        if rejected:
            warnings.warn(
                f"lightning-landscape: EnergyLandscape at step {step} rejected {len(rejected)} quenched points whose"
                f" loss or parameters are not finite ({', '.join(rejected[:4])}). HINT: lower the replicas'"
                " `sampling.lr` or `sampling.temperature`.",
                RuntimeWarning,
                stacklevel=2,
            )
        previous = self.previous_minimum
        first = []
        if previous is not None and current is not None and previous != current and previous < len(db):
            first = [(min(previous, current), max(previous, current))]
        return (
            db,
            current,
            new_minima,
            plan_joins(
                db,
                probe,
                found,
                self.basins.merge_barrier,
                self.basins,
                self.paths,
                first,
                noise,
                self.quench,
                step=step,
            ),
        )

    def _restarts(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[int, Any]:
        """Rank 0: which replicas restart, and where (:func:`restart_points` over the candidates, least-visited
        first): ``{replica: k}`` for the previous trigger's end ``k``, ``{replica: (snapshot step, trainable
        parameters)}`` for a TrajectoryRecorder snapshot taken before ``step`` (visits: the chain's points in the
        state of the training path's point at that step; unknown, and so taken last, where the path has none)."""
        from lightning_landscape.callbacks.trajectory import TrajectoryRecorder

        recorder = TrajectoryRecorder.find(trainer)
        store = recorder.store if recorder is not None else None
        snapshots: list[tuple[int, int | str]] = []  # (step, the store's name of the snapshot)
        if store is not None:
            snapshots = [(s, s) for s in store.snapshot_steps if s < step]
            if not (snapshots and snapshots[0][0] == 0) and (store.path / "snapshots" / "init.npy").exists():
                snapshots.insert(0, (0, "init"))
        visits = [*self._visits, *(self._path_visits.get(s, float("nan")) for s, _ in snapshots)]
        chosen = restart_points(self.sampling.replicas, self.sampling.restarts, visits)
        restarts: dict[int, Any] = {}
        if chosen and snapshots:
            everything = ParameterLayout.from_module(pl_module, trainable_only=False)
            trainable = [everything.slices()[n] for n in ParameterLayout.from_module(pl_module).names]
        for replica, k in chosen.items():
            if k < len(self._visits):
                restarts[replica] = k
                continue
            at, name = snapshots[k - len(self._visits)]
            try:
                flat = np.asarray(store.snapshot(name))
            except Exception as err:  # a snapshot is one candidate: the trigger stands without it
                self._part_failed(
                    step, "restarts", f"read the snapshot of step {at}", err, "that replica starts at x0."
                )
                continue
            if flat.shape == (everything.numel,):  # else the module has changed since: that replica starts at x0
                restarts[replica] = (at, np.concatenate([flat[s] for s in trainable]))
        return restarts

    def _chain(
        self,
        trainer: pl.Trainer,
        step: int,
        excursions: Excursions,
        probe: Objective,
        scalars: dict,
        restarts: dict[int, Any],
    ) -> None:
        """Rank 0: one Markov chain of every replica of every trigger so far (read back from the run directory) and
        of the training path; the training path's metastable stages; the transition from the initial weights' set to
        the current weights' (where they lie outside the connected set: from the first set the path entered, to the
        last, ``chain_transition["source_step"]`` and ``["target_step"]``), by TPT: pathways, rate, MFPT in replica
        steps; the path atlas; and the chain's visits of this trigger's ends, for the next trigger's restarts."""
        if not len(excursions.replica_ids):
            return
        if self._columns is None:
            self._columns = chain_columns(excursions.outputs.shape[-1], self.sampling.seed)
        if not self._path_steps:  # the path could not be recorded: this trigger's start stands for it
            self._path_steps, self._path_accuracy, self._path_rules = [step], [float("nan")], [None]
            self._path_features = [np.asarray(excursions.outputs[0][0, self._columns], dtype=np.float32)]
        folder = self.reporter.run_dir / "excursions"
        features, losses, accuracy, keys, rules = [], [], [], {}, {}
        for trigger, replica, outputs, path in saved_replicas(folder):
            keys[(trigger, replica)] = len(features)
            outputs = np.asarray(outputs)
            features.append(outputs[:, self._columns].astype(np.float64))
            store = TrajectoryStore.open(path)
            losses.append(store.stats["loss"])
            accuracy.append(probe_accuracy(outputs, self._probe_batches))
            rules.setdefault(step_rule(store.meta), trigger)
        if len(rules) > 1 and not self._warned_rules:
            self._warned_rules = True
            warnings.warn(
                f"lightning-landscape: EnergyLandscape at step {step}: the chain of all triggers mixes replicas of"
                f" {len(rules)} step rules ((lr, momentum) first seen at steps "
                + ", ".join(f"{rule} at {at}" for rule, at in rules.items())
                + "), e.g. under a learning-rate schedule: its transition matrix, rates and first-passage times are"
                " of that mixture. HINT: fix `sampling.lr` (and `sampling.momentum`) for one dynamics.",
                RuntimeWarning,
                stacklevel=2,
            )
        fragments = self._path_fragments(trainer)
        first, steps = len(features), np.asarray(self._path_steps)
        np.savez(
            folder / "training-path.npz",
            steps=steps,
            features=np.stack(self._path_features),
            accuracy=np.asarray(self._path_accuracy),
            columns=self._columns,
            fragment=np.concatenate([np.full(len(piece), k) for k, piece in enumerate(fragments)]),
            probe=[self.probe_metadata["probe_size"], self.probe.seed],  # analyze joins runs of one probe set only
        )
        for piece in fragments:
            features.append(np.stack([self._path_features[i] for i in piece]).astype(np.float64))
            losses.append(np.full(len(piece), np.nan))  # the replicas' losses are minibatch energies; no such here
            accuracy.append(np.asarray([self._path_accuracy[i] for i in piece]))
        path = [(first + f, i) for f, piece in enumerate(fragments) for i in range(len(piece))]
        chain = chain_of(
            features,
            {"loss": losses, "accuracy": accuracy},
            path,
            [*path, (keys[(step, 0)], 0)],  # the current point last: the target when it is in the connected set
            self.msm,
            self.sampling.seed,
            step=self.msm.lag * self.sampling.record_every,
        )
        scalars.update(
            chain_points=chain.points,
            chain_connected=chain.connected,
            chain_restarts=len(restarts),
            chain_restarts_snapshots=sum(not isinstance(origin, int) for origin in restarts.values()),
        )
        if chain.model is None:
            self.chain_transition = {"none": str(chain.transition)}
            return
        counts = np.bincount(np.concatenate(chain.model.dtrajs))
        self._visits = [float(counts[chain.model.dtrajs[keys[key]][-1]]) for key in self._candidate_keys]
        self._path_visits = {
            int(steps[i]): float(counts[state])
            for piece, dtraj in zip(fragments, chain.model.dtrajs[first:], strict=True)
            for i, state in zip(piece, dtraj, strict=True)
        }
        scalars["chain_sets"] = len(chain.model.sets) or 1
        self.chain_stages = training_stages(chain.model, chain.model.dtrajs[first:], [steps[p] for p in fragments])
        scalars["chain_stages"] = len(self.chain_stages)
        columns = ["set", "first_step", "last_step", "points"]
        self.reporter.table("stages", columns, [[row[c] for c in columns] for row in self.chain_stages], step)
        if chain.connected < 0.9 and not self._warned_chain:
            self._warned_chain = True
            warnings.warn(
                f"lightning-landscape: EnergyLandscape at step {step}: the chain of all triggers is disconnected, only"
                f" {100 * chain.connected:.0f}% of its {chain.points} points lie in its largest connected set: the"
                " replicas of different triggers do not meet, so rates and pathways between them are unknown."
                " HINT: raise `sampling.restarts` (replicas from earlier ends), `sampling.steps`, or trigger more"
                " often.",
                RuntimeWarning,
                stacklevel=2,
            )
        robustness = chain.robustness
        if robustness is not None:
            scalars.update(
                chain_sets_robust=len(robustness.robust_sets()),
                chain_transition_agreement=robustness.transition,
                chain_metastable=float(robustness.metastable),
            )
        if isinstance(chain.transition, str):
            self.chain_transition = {"none": chain.transition}
            return
        if robustness is not None and not robustness.transition_survives:  # claimed only where the data hold it
            self.chain_transition = {"none": not_robust(robustness)}
            return
        summary = transition_summary(chain.model, chain.transition)
        self.chain_transition = {k: summary[k] for k in ("source_set", "target_set", "mfpt_steps", "pathways")}
        for end, (t, i) in (("source_step", chain.source), ("target_step", chain.target)):
            self.chain_transition[end] = int(steps[fragments[t - first][i]]) if t >= first else step
        scalars.update(chain_mfpt=summary["mfpt_steps"], chain_rate=summary["rate_per_step"])
        rows = [[" -> ".join(map(str, p["sets"])), p["share"]] for p in summary["pathways"]]
        self.reporter.table("pathways", ["sets", "share"], rows, step)
        self.reporter.figure("path_atlas", path_atlas_figure(summary), step)

    def _replica_rule(self, trainer: pl.Trainer) -> tuple[float, float]:
        """The replicas' ``(lr, momentum)``: ``sampling.lr`` and ``sampling.momentum``, each None taken from
        training (the first optimizer's lr; the momentum of :func:`_sgd_rule`, 0 for another optimizer)."""
        rule = _sgd_rule(trainer)
        lr = self.sampling.lr or float(trainer.optimizers[0].param_groups[0]["lr"])
        momentum = self.sampling.momentum if self.sampling.momentum is not None else rule[1] if rule else 0.0
        return lr, float(momentum)

    def _path_fragments(self, trainer: pl.Trainer) -> list[list[int]]:
        """The training path's points (indices) as the chain's trajectories: runs of consecutive recordings, one
        ``record_every`` apart (a resume or ``training_path=False`` breaks them), linked where training stepped as
        the replicas do (:meth:`_replica_rule`: one SGD at their learning rate and momentum, at both points, so a
        learning-rate schedule breaks the path where the rule changed); single points otherwise, located in the
        chain but not counted: a step of Adam, or of SGD at another rate, is not a replica's step, and counting it
        would mix two dynamics in one transition matrix."""
        rule = self._replica_rule(trainer)
        fragments: list[list[int]] = []
        for i, step in enumerate(self._path_steps):
            follows = i > 0 and step - self._path_steps[i - 1] == self.sampling.record_every
            if follows and self._path_rules[i - 1] == self._path_rules[i] == rule:
                fragments[-1].append(i)
            else:
                fragments.append([i])
        return fragments

    @staticmethod
    def _add_minimum(db: MinimaDatabase, probe: Objective, point: Minimum, **info: Any) -> tuple[int, bool]:
        """A quenched point into the database, with its probe accuracy."""
        accuracy = float(probe_accuracy(point.outputs[None], probe.batches)[0])
        return add_minimum(db, point, accuracy=accuracy, **info)

    def _markov_state_model(self, excursions: Excursions, scalars: dict[str, float]) -> MarkovModel | None:
        """The MSM of this trigger's replicas: the metastable sets of the basin that training is in now, at the
        training noise (rank 0). None while there are too few points."""
        sketches, losses = list(excursions.sketches), list(excursions.losses)
        outputs = list(excursions.outputs) if excursions.outputs is not None else [None] * len(sketches)
        features = sketches if self.msm.features == "sketch" or excursions.outputs is None else outputs
        accuracy = [
            probe_accuracy(o, self._probe_batches) if o is not None else np.full(len(values), np.nan)
            for o, values in zip(outputs, losses, strict=True)
        ]
        model = markov_model(
            features, self.msm, {"loss": losses, "accuracy": accuracy}, self.sampling.seed, plane_points=sketches
        )
        if model is None:
            return None
        if len(model.msm.timescales):
            scalars["slowest_timescale"] = float(model.msm.timescales[0]) * self.sampling.record_every
        scalars["metastable_states"] = len(model.sets) or 1
        return model

    def _report(
        self,
        step: int,
        db: MinimaDatabase,
        basins: BasinsResult,
        paths: list,
        msm: MarkovModel | None,
        tree: Any,
        scalars: dict,
        meta: dict,
    ) -> None:
        rep = self.reporter
        rep.scalars(scalars, step)
        rep.table(
            "minima",
            [
                "id",
                "basin",
                "loss",
                "grad_norm",
                "grad_ratio",
                "quench_converged",
                "quench_criterion",
                "certified",
                "lambda_min",
                "energy_error",
                "accuracy",
                "visits",
                "step",
                "source",
            ],
            [
                [
                    r["id"],
                    int(basins.labels[r["id"]]),
                    r["loss"],
                    r.get("grad_norm", np.nan),
                    r.get("grad_ratio", np.nan),
                    bool(r.get("quench_converged", False)),
                    r.get("quench_criterion", ""),
                    certified,
                    r.get("lambda_min", np.nan),
                    r.get("energy_error", np.nan),
                    r.get("accuracy", np.nan),
                    r.get("visits", 1),
                    r.get("step", -1),
                    r.get("source", ""),
                ]
                for r, certified in zip(db.records, db.certified, strict=True)
            ],
            step,
        )
        rep.table(
            "basins",
            ["basin", "loss", "minimum", "members", "visits", "first_step"],
            [
                [b["basin"], b["loss"], b["minimum"], " ".join(map(str, b["members"])), b["visits"], b["first_step"]]
                for b in basins.rows
            ],
            step,
        )
        rep.table("barriers", BARRIER_COLUMNS, barrier_rows(db), step)
        if paths:
            rep.figure("paths", paths_figure([(f"{i} - {j}", p.arc, p.losses) for i, j, p in paths]), step)
        if tree is not None:
            what = f"{basins.n_basins} basins" if basins.n_basins > 1 else "the minima of 1 basin"
            title = f"disconnectivity graph of {what} at step {step}"
            rep.figure("disconnectivity", disconnectivity_figure(tree, title), step)
        arrays: dict[str, Any] = {
            "minima_losses": db.losses,
            "saddles": db.saddle_matrix(),
            "basin_labels": basins.labels,
            "basin_losses": np.asarray([r["loss"] for r in basins.rows]),
            "basin_saddles": basins.saddles,
        }
        if msm is not None:
            model = msm.msm
            every = self.sampling.record_every
            rep.figure(
                "timescales",
                timescales_figure(model.its_lags * every, model.implied_timescales * every, "replica steps"),
                step,
            )
            centers, points, explained = msm.plane
            rep.figure("free_energy", free_energy_figure(centers, model.free_energy, points, explained), step)
            if model.metastable_assignment is not None:
                columns = ["set", "population", "mean_loss", "mean_accuracy", "points"]
                rep.table("metastable", columns, [[row[c] for c in columns] for row in msm.sets], step)
            arrays.update(
                transition_matrix=model.transition_matrix,
                stationary=model.stationary_distribution,
                free_energy=model.free_energy,
                its_lags=model.its_lags,
                implied_timescales=model.implied_timescales,
                ck_steps=model.ck_steps,
                ck_error=model.ck_error,
                active_set=model.active_set,
            )
        metadata = {
            **meta,
            **self.probe_metadata,
            "step": step,
            "lag_steps": self.msm.lag * self.sampling.record_every,
            "temperature": self.sampling.temperature,
            "seed": self.sampling.seed,
            "features": self.msm.features,
            "merge_barrier": self.basins.merge_barrier,  # None: each pair at the noise along it
        }
        rep.arrays("energy", step, metadata=metadata, **arrays)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "history": self.history,
            "previous_minimum": self.previous_minimum,
            "minima_dir": self.minima_dir,
            "minima_names": self.minima_names,
            # the training path's first point, the chain's start: a resumed run keeps it (the rest is in the run dir)
            "path_start": [self._path_steps[0], self._path_features[0].tolist(), self._path_accuracy[0]]
            if self._path_steps
            else None,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.history = list(state_dict.get("history", []))
        self.previous_minimum = state_dict.get("previous_minimum")
        self.minima_dir = state_dict.get("minima_dir", self.minima_dir)
        self._resumed = True
        self.minima_names = state_dict.get("minima_names", self.minima_names)
        start = state_dict.get("path_start")
        if start is not None:
            self._path_steps, self._path_accuracy, self._path_rules = [int(start[0])], [float(start[2])], [None]
            self._path_features = [np.asarray(start[1], dtype=np.float32)]
