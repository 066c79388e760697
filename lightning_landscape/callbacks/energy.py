"""EnergyLandscape: the global energy landscape around the training trajectory, built trigger by trigger.

Each trigger (every ``n`` steps or epochs, at fit end, or :meth:`run_now`) runs the stages of
:mod:`lightning_landscape.energy`, each configured by one small dataclass: **basin sampling** (``sampling``:
replicas of SGD or SGLD from the current point, split over DDP ranks), **minima** (``quench``: the current point and
every replica's end quenched and certified, into a persistent minima database), **basins** (``basins``, ``paths``:
minima joined by straight lines or minimum-energy paths, merged where the barrier is below the noise along it), the
**Markov state model** of this trigger's replicas and the **chain of all triggers** (``msm``: every replica so far
and the training path; metastable stages of training, transition path theory from the initial weights' set to the
current one's), and the **disconnectivity graph** of the basins. The callback only decides when and where: it
schedules the stages, splits them over ranks and keeps to its ``budget`` (every rank follows rank 0's decision);
what a trigger found is one :class:`~lightning_landscape.energy.EnergyResult`, written once at its end.

Outputs, in ``<run dir>/energy/`` and W&B (see ``docs/energy.md``): figures ``disconnectivity``, ``timescales``,
``paths``, ``free_energy``, ``path_atlas``; tables ``minima``, ``basins``, ``barriers``, ``metastable``,
``pathways``, ``stages``; the scalars of :attr:`EnergyLandscape.logged`; the minima database in ``minima/``, every
replica in ``excursions/step-<n>/`` and the training path's chain features in ``excursions/training-path.npz``.

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
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

from lightning_landscape import budget as clock
from lightning_landscape import distributed
from lightning_landscape.budget import Budget, PassCount
from lightning_landscape.callbacks.base import LandscapeCallback, global_batch_size
from lightning_landscape.checks import as_config, check_float
from lightning_landscape.dynamics import Excursions, SparseProjection
from lightning_landscape.energy import plan, trigger
from lightning_landscape.energy.basins import minimum_path, plan_joins
from lightning_landscape.energy.chain import TriggerChain, restart_points
from lightning_landscape.energy.configs import BasinConfig, MSMConfig, PathConfig, QuenchConfig, SamplingConfig
from lightning_landscape.energy.quench import Minimum, quench_point
from lightning_landscape.energy.result import EnergyResult
from lightning_landscape.energy.run_minima import RunMinima
from lightning_landscape.energy.sampling import CrossingNoise, sample
from lightning_landscape.geometry.paths import PathResult
from lightning_landscape.guard import preserve_state
from lightning_landscape.objective import Objective
from lightning_landscape.params import ParameterLayout, weight_decay_of
from lightning_landscape.probe import ProbeSpec, probe_accuracy
from lightning_landscape.report.logged import Logged

if TYPE_CHECKING:
    import lightning.pytorch as pl


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


@dataclass
class _Work:
    """What the stages of one trigger share: its step, the probe and pool objectives and the batch passes they
    had spent before it, the current point, the replicas' step rule and sketch, and what the stages decide on the
    way (the noise and merge level, where restarted replicas came from)."""

    step: int
    probe: Objective
    pool: Objective
    x0: torch.Tensor
    lr: float
    momentum: float
    sketch: SparseProjection
    spend: PassCount
    start: float
    noise: CrossingNoise | None = None
    level: float = 0.0
    restarted_from: list[list[int]] = field(default_factory=list)


class EnergyLandscape(LandscapeCallback):
    """Basin sampling, quenched minima joined into basins, minimum-energy paths, a Markov state model and the
    disconnectivity graph of the basins, every trigger.

    Each stage is configured by one small dataclass of :mod:`lightning_landscape.energy` (or a dict of
    its fields; in YAML a nested mapping), whose defaults work without tuning.

    Args:
        every_n_steps: run every ``n`` optimizer steps (and :meth:`run_now` on demand).
        every_n_epochs: run at the end of every ``n``-th epoch.
        at_fit_end: run when training ends.
        sampling: :class:`~lightning_landscape.energy.SamplingConfig`: replicas, their steps, ``lr`` (default:
            training's), SGLD ``temperature``, recording, the minibatch pool, seeds and the sketch. With a
            :class:`TrajectoryRecorder` in the trainer, its projection sketches the replicas too.
        quench: :class:`~lightning_landscape.energy.QuenchConfig`: L-BFGS iterations, relative tolerance and the
            function-space dedup of minima.
        basins: :class:`~lightning_landscape.energy.BasinConfig`: ``merge_barrier`` (default: each pair's noise
            along its barrier, ``T + lr s_d / (2 (1 - beta))``, see :mod:`~lightning_landscape.energy`).
        paths: :class:`~lightning_landscape.energy.PathConfig`: images, FIRE iterations, method and ``max_paths``.
        msm: :class:`~lightning_landscape.energy.MSMConfig`: lag, states, features and PCCA+ sets.
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
        #: rank 0: the run's minima database across triggers
        self.minima = RunMinima(self.quench.dedup_tol)
        self._resumed = False
        self.history: list[dict[str, Any]] = []
        self._pool: list[Any] | None = None
        self._warned_quenches = False
        self._candidates: list[torch.Tensor] = []  # the last trigger's replica ends: where restarts may start
        self._candidate_keys: list[tuple[int, int]] = []  # (step, replica) of each
        self._path_failed = False
        #: rank 0: the training path and the chain of all triggers
        self.chain = TriggerChain(self.msm, self.sampling.seed, self.sampling.record_every)

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
        """Refuse, before training, a model on which a trigger's least work does not fit on ``device``
        (:func:`~lightning_landscape.energy.plan.check_memory`)."""
        plan.check_memory(n_params, self.probe.dtype, self.quench.dtype, self.paths, device)

    def _plan_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The probe set's size and batch size, measured once at the start of training on a sample batch
        (:func:`~lightning_landscape.energy.plan.plan_probe`; rank 0 decides for every rank; both are warned about,
        recorded and kept for the fit, so every trigger measures one energy)."""
        spec, allowed = self.probe, plan.allowed_seconds(self.budget)
        decision: plan.ProbePlan | str = plan.ProbePlan(spec.size, spec.batch_size or spec.size)
        if trainer.is_global_zero:
            try:
                n = min(spec.size, 32)
                sample = self.draw_batches(trainer, n, n, spec.seed, sharded=False)
                smallest = 2 * (getattr(trainer.train_dataloader, "batch_size", None) or 16)
                decision = plan.plan_probe(pl_module, sample, spec, self.quench.dtype, allowed, smallest)
            except Exception as err:  # the loss itself fails: the check that follows says why, with a hint
                decision = f"{type(err).__name__}: {err}"
        decision = distributed.broadcast(trainer.strategy, decision)
        if isinstance(decision, str):
            return
        if trainer.is_global_zero:
            plan.warn_plan(decision, spec, allowed, pl_module.device)
        self.probe = replace(self.probe, size=decision.size, batch_size=decision.batch_size)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._resumed and trainer.is_global_zero:
            self.minima.resume(self.reporter.run_dir, trainer.global_step)
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
        if not (always or due) or (self.chain.path.steps and self.chain.path.steps[-1] == step):
            return
        try:
            with preserve_state(pl_module, ()), torch.inference_mode(False):
                probe = self.objective(trainer, pl_module) if self._stale(pl_module) else self._objective
                outputs = probe.outputs(probe.theta0).reshape(1, -1).double().cpu().numpy()
            self.chain.record(step, outputs, float(probe_accuracy(outputs, probe.batches)[0]), _sgd_rule(trainer))
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
    def _may_continue(self, trainer: pl.Trainer, spend: PassCount) -> bool:
        """Rank 0's decision, on every rank: is any budget left (batch passes summed over ranks, and time)?"""
        passes = spend.total(trainer.strategy)
        left = (self.budget.passes is None or passes < self.budget.passes) and self.time_left() > 0
        return bool(distributed.broadcast(trainer.strategy, left))

    # ------------------------------------------------------------------ the analysis
    @override
    def stages(self) -> int:
        return 6

    def _projection(self, trainer: pl.Trainer, pl_module: pl.LightningModule, x0: torch.Tensor) -> SparseProjection:
        """The replicas' sketch: a TrajectoryRecorder's projection when one runs (one basis for trajectories and
        replicas), else their own."""
        from lightning_landscape.callbacks.trajectory import TrajectoryRecorder

        recorder = TrajectoryRecorder.find(trainer)
        if recorder is not None:
            return recorder.projection_for(pl_module, x0)
        return SparseProjection(x0.numel(), self.sampling.sketch_dim, self.sampling.projection_seed, 1, x0.device)

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

    def _rounds(
        self, trainer: pl.Trainer, n: int, stage: str, work: Any, spend: PassCount, first_always: bool = False
    ) -> list[Any]:
        """``work(i)`` for ``i < n`` split over ranks (:func:`~lightning_landscape.distributed.in_rounds`) while the
        budget lasts (with ``first_always``, the first round in any case)."""

        def go_on(first: int) -> bool:
            return (first_always and first == 0) or self._may_continue(trainer, spend)

        return distributed.in_rounds(trainer.strategy, n, work, go_on, f"EnergyLandscape stage {stage!r}")

    def _replica_rounds(self, trainer: pl.Trainer, spend: PassCount, run: Any) -> list[Excursions]:
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
            began, passes = time.perf_counter(), spend.total(trainer.strategy)
            mine = None
            with self.stage(trainer, "basin sampling"), clock.deadline(stage_left(), trainer):
                if ids[rank::world]:
                    mine = run(ids[rank::world])
            results += [r for r in distributed.gather_objects(trainer.strategy, mine) if r is not None]
            done += len(ids)
            affordable = float(total - done)  # replicas the budget left allows, at the cost of this round's
            seconds, spent = (
                (time.perf_counter() - began) / len(ids),
                (spend.total(trainer.strategy) - passes) / len(ids),
            )
            if math.isfinite(stage_left()):
                affordable = min(affordable, stage_left() / max(seconds, 1e-9))
            if self.budget.passes is not None:
                affordable = min(affordable, (self.budget.passes - spend.total(trainer.strategy)) / max(spent, 1.0))
            per_rank = int(distributed.broadcast(trainer.strategy, max(1, int(affordable // world))))
        return results

    @override
    def analyze(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        # anytime inside a rank's own work items (quenches and their certificates stop at the deadline, stored
        # uncertified); the decisions between items are rank 0's (_may_continue)
        with clock.deadline(self.time_left(), trainer):
            self._analyze(trainer, pl_module, step)

    def _analyze(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """The trigger as its list of stages: every rank samples, quenches and computes paths (their work split over
        ranks, rank 0 deciding between items while the budget lasts); rank 0 admits the minima, plans the joins and
        concludes (dips, basins, the Markov models, the result)."""
        self._mark, self._timings = time.perf_counter(), {}
        work = self._objectives(trainer, pl_module, step)
        excursions, restarts = self._sample(trainer, pl_module, work)
        quenched = self._quench(trainer, work, excursions)
        joining = self._join(trainer, work, quenched, excursions)
        passes = work.spend.total(trainer.strategy)
        if trainer.is_global_zero:
            result = self._conclude(trainer, work, excursions, restarts, quenched, joining, passes)
            result.write(self.reporter, step)

    def _objectives(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> _Work:
        with self.stage(trainer, "objectives"):
            probe = self.objective(trainer, pl_module)
            pool = self._pool_objective(trainer, pl_module)
            lr, momentum = self._replica_rule(trainer)
            l2 = self.weight_decay if self.weight_decay is not None else weight_decay_of(trainer.optimizers, pl_module)
            probe.set_l2(l2)
            pool.set_l2(l2)
            sketch = self._projection(trainer, pl_module, probe.theta0)
            spend = PassCount(probe, pool)
            return _Work(step, probe, pool, probe.theta0, lr, momentum, sketch, spend, time.perf_counter())

    def _sample(self, trainer: pl.Trainer, pl_module: pl.LightningModule, work: _Work) -> tuple[Excursions, dict]:
        """1. Basin sampling: some replicas from earlier points (previous ends, the recorder's snapshots; the
        least-visited first), the rest from the current point, in rounds while the budget lasts; saved (rank 0)."""
        restarts: dict[int, Any] = {}
        if self.sampling.restarts > 0:  # the same on every rank: a collective follows
            with self.stage(trainer, "basin sampling"):
                if trainer.is_global_zero:
                    restarts = self._restarts(trainer, pl_module, work.step)
            restarts = distributed.broadcast(trainer.strategy, restarts)
        starts = None
        if restarts:
            starts = work.x0.detach().cpu().expand(self.sampling.replicas, -1).clone()
            for replica, origin in restarts.items():
                point = self._candidates[origin] if isinstance(origin, int) else torch.from_numpy(origin[1])
                starts[replica] = point.to(starts.dtype)

        def replicas(ids: list[int]) -> Excursions:
            run = sample(
                work.pool,
                work.x0,
                self.sampling,
                work.lr,
                replicas=ids,
                seed_offset=work.step,
                sketch=work.sketch,
                probe=work.probe,
                starts=starts,
                momentum=work.momentum,
            )
            run.finals = run.finals.cpu()  # gathered between ranks: no device indices
            return run

        runs = self._replica_rounds(trainer, work.spend, replicas)
        with self.stage(trainer, "basin sampling"):
            excursions = Excursions.concatenate(runs) if runs else replicas([])
            # where each restarted replica started: [replica, step, replica there (-1: the recorder's snapshot)]
            work.restarted_from = [
                [k, *map(int, self._candidate_keys[o] if isinstance(o, int) else (o[0], -1))]
                for k, o in sorted(restarts.items())
            ]
            # this trigger's ends, on every rank (gathered): where the next trigger's restarts may start
            self._candidates = [excursions.finals[i] for i in range(len(excursions.replica_ids))]
            self._candidate_keys = [(work.step, int(r)) for r in excursions.replica_ids]
            if trainer.is_global_zero and len(excursions.replica_ids):
                layout = {"names": list(work.probe.layout.names), "shapes": [list(s) for s in work.probe.layout.shapes]}
                sketch = {"k": work.sketch.k, "projection_seed": work.sketch.seed, "nnz": work.sketch.nnz}
                folder = self.reporter.run_dir / "excursions" / f"step-{work.step:09d}"
                excursions.save(folder, {**sketch, "step": work.step, **layout})
        self.advance("basin sampling")
        return excursions, restarts

    def _quench(self, trainer: pl.Trainer, work: _Work, excursions: Excursions) -> list[Minimum]:
        """2. The current point (always) and the replicas' ends quenched, to a tenth of the fixed merge level or of
        the noise level (without a fixed level, each pair of minima merges at the noise along it: rank 0 measures
        it), split over ranks while the budget lasts."""
        with self.stage(trainer, "minima"):
            candidates = torch.cat([work.x0[None].cpu(), excursions.finals.to(work.x0.dtype)])
            if self.basins.merge_barrier is None and trainer.is_global_zero:
                work.noise = CrossingNoise.measure(
                    work.pool, work.x0, work.lr, self.sampling.temperature, work.momentum
                )
        level = self.basins.merge_barrier if work.noise is None else work.noise.level
        work.level = float(distributed.broadcast(trainer.strategy, level))
        quench = lambda i: quench_point(work.probe, candidates[i].to(work.x0), self.quench, work.level)  # noqa: E731
        quenched = self._rounds(trainer, len(candidates), "minima", quench, work.spend, first_always=True)
        self.advance("minima")
        return quenched

    def _join(self, trainer: pl.Trainer, work: _Work, quenched: list[Minimum], excursions: Excursions) -> Any:
        """3. Rank 0: the quenched points into the minima database and the joins planned (straight lines where they
        suffice; the current minimum to the previous trigger's first); the planned paths split over ranks.
        Returns ``(database, current minimum, new minima, plan, computed paths)`` on rank 0."""
        plan, joined = None, (None, None, 0, None)
        with self.stage(trainer, "minima database"):
            if trainer.is_global_zero:
                meta, names = {**work.probe.metadata, **self.probe_metadata}, list(work.probe.layout.names)
                db = self.minima.open(self.reporter.run_dir, meta, names, work.step)
                sources = ["training", *(f"replica {r}" for r in excursions.replica_ids)][: len(quenched)]
                ids, new_minima = trigger.admit_all(db, quenched, sources, work.probe.batches, work.step)
                current, previous = ids[0] if ids else None, self.minima.previous
                first = (
                    []
                    if None in (previous, current) or previous == current
                    else [(min(ids[0], previous), max(ids[0], previous))]
                )
                found = [i for i in ids if i is not None]
                configs = (self.basins, self.paths)
                joins = plan_joins(
                    db,
                    work.probe,
                    found,
                    self.basins.merge_barrier,
                    *configs,
                    first,
                    work.noise,
                    self.quench,
                    step=work.step,
                )
                plan = [(i, j, torch.from_numpy(db.theta(i)), torch.from_numpy(db.theta(j))) for i, j in joins.paths]
                joined = (db, current, new_minima, joins)
        plan = distributed.broadcast(trainer.strategy, plan)

        def path(k: int) -> tuple[int, int, PathResult]:
            i, j, a, b = plan[k]
            return i, j, minimum_path(work.probe, a.to(work.x0), b.to(work.x0), self.paths, work.level)

        found_paths = self._rounds(trainer, len(plan), "paths", path, work.spend)
        self.advance("paths")
        return (*joined, found_paths)

    def _conclude(
        self,
        trainer: pl.Trainer,
        work: _Work,
        excursions: Excursions,
        restarts: dict[int, Any],
        quenched: list[Minimum],
        joining: Any,
        passes: int,
    ) -> EnergyResult:
        """4. Rank 0: the dips along the paths, the basins, this trigger's Markov model and the chain of all
        triggers, as one :class:`~lightning_landscape.energy.EnergyResult`."""
        db, current, new_minima, joins, found_paths = joining
        step, rank_zero = work.step, PassCount(work.probe)  # what rank 0 spends alone from here
        result, warning = trigger.minima_result(
            db,
            work.probe,
            quenched,
            found_paths,
            joins,
            (self.basins, self.paths, self.quench),
            level=work.level,
            noise=work.noise,
            step=step,
            current=current,
            previous=self.minima.previous,
            new_minima=new_minima,
        )
        if warning is not None and not self._warned_quenches:
            self._warned_quenches = True
            warnings.warn(warning, RuntimeWarning, stacklevel=2)
        self.minima.previous = current
        self.advance("basins")
        try:
            every = self.sampling.record_every
            msm, scalars = trigger.replica_model(excursions, self.msm, self._probe_batches, self.sampling.seed, every)
            result.scalars.update(scalars)
            if msm is not None:
                result.add_markov(msm, every, "replica steps")
        except Exception as err:  # too little or disconnected data: the rest of the trigger still stands
            hint = "minima, basins and graph are still reported. HINT: raise `sampling.replicas` or `sampling.steps`."
            self._part_failed(step, "markov state model", "fit the Markov state model", err, hint)
        try:
            if len(excursions.replica_ids):
                result.scalars.update(
                    chain_restarts=len(restarts),
                    chain_restarts_snapshots=sum(not isinstance(origin, int) for origin in restarts.values()),
                )
                folder, width = self.reporter.run_dir / "excursions", excursions.outputs.shape[-1]
                probe_key = [self.probe_metadata["probe_size"], self.probe.seed]
                rule = self._replica_rule(trainer)
                self.chain.update(folder, step, width, rule, self._probe_batches, probe_key, result)
        except Exception as err:  # the chain is a view over all triggers: this trigger still stands
            standing = "this trigger's results are still reported."
            self._part_failed(step, "chain", "fit the chain of all triggers", err, standing)
        self.advance("Markov state model")
        self.advance("disconnectivity graph")
        result.scalars.update(self._timings)
        result.scalars.update(
            replicas_run=len(excursions.replica_ids),
            spent_passes=passes + rank_zero.local(),
            spent_seconds=time.perf_counter() - work.start,
        )
        self.history.append({"step": step, **result.scalars, "restarted_from": work.restarted_from})
        result.metadata = {
            **work.probe.metadata,
            **self.probe_metadata,
            "step": step,
            "lag_steps": self.msm.lag * self.sampling.record_every,
            "temperature": self.sampling.temperature,
            "seed": self.sampling.seed,
            "features": self.msm.features,
            "merge_barrier": self.basins.merge_barrier,  # None: each pair at the noise along it
        }
        return result

    @property
    def minima_dir(self) -> str | None:
        """The folder of the run's minima database (:class:`~lightning_landscape.energy.run_minima.RunMinima`)."""
        return self.minima.folder

    def _restarts(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[int, Any]:
        """Rank 0: which replicas restart, and where (:func:`restart_points` over the candidates, least-visited
        first): ``{replica: k}`` for the previous trigger's end ``k``, ``{replica: (snapshot step, trainable
        parameters)}`` for a TrajectoryRecorder snapshot taken before ``step`` (visits: the chain's points in the
        state of the training path's point at that step; unknown, and so taken last, where the path has none)."""
        from lightning_landscape.callbacks.trajectory import TrajectoryRecorder

        recorder = TrajectoryRecorder.find(trainer)
        snapshots = recorder.snapshots_before(step) if recorder is not None else []
        ends = [self.chain.visits.get(key, float("nan")) for key in self._candidate_keys]
        visits = [*ends, *(self.chain.path_visits.get(s, float("nan")) for s, _ in snapshots)]
        restarts: dict[int, Any] = {}
        for replica, k in restart_points(self.sampling.replicas, self.sampling.restarts, visits).items():
            if k < len(ends):
                restarts[replica] = k
                continue
            at, name = snapshots[k - len(ends)]
            try:
                flat = recorder.trainable_snapshot(name, pl_module)
            except Exception as err:  # a snapshot is one candidate: the trigger stands without it
                self._part_failed(
                    step, "restarts", f"read the snapshot of step {at}", err, "that replica starts at x0."
                )
                continue
            if flat is not None:  # else the module has changed since: that replica starts at x0
                restarts[replica] = (at, flat)
        return restarts

    @property
    def chain_stages(self) -> list[dict[str, int]]:
        """The training path's metastable stages in the last chain: ``{"set", "first_step", "last_step", "points"}``."""
        return self.chain.stages

    @property
    def chain_transition(self) -> dict[str, Any]:
        """The last trigger's transition in the chain of all triggers (sets, MFPT, pathways), or ``{"none": why}``."""
        return self.chain.transition

    def _replica_rule(self, trainer: pl.Trainer) -> tuple[float, float]:
        """The replicas' ``(lr, momentum)``: ``sampling.lr`` and ``sampling.momentum``, each None taken from
        training (the first optimizer's lr; the momentum of :func:`_sgd_rule`, 0 for another optimizer)."""
        rule = _sgd_rule(trainer)
        lr = self.sampling.lr or float(trainer.optimizers[0].param_groups[0]["lr"])
        momentum = self.sampling.momentum if self.sampling.momentum is not None else rule[1] if rule else 0.0
        return lr, float(momentum)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "history": self.history,
            **self.minima.state_dict(),
            **self.chain.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.history = list(state_dict.get("history", []))
        self.minima.load_state_dict(state_dict)
        self._resumed = True
        self.chain.load_state_dict(state_dict)
