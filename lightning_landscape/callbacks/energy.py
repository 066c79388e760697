"""EnergyLandscape: the global energy landscape around the training trajectory, built trigger by trigger.

Each trigger (every ``n`` steps or epochs, at fit end, or :meth:`run_now`):

1. **basin sampling**: ``replicas`` runs of ``replica_steps`` SGD (or SGLD at ``temperature``) steps from the
   current point, at the training learning rate and batch size (constant ``lr/B``), on a fixed pool of
   training batches; never touching the module or the optimizer
   (:func:`~lightning_landscape.dynamics.sample_basin`). Replicas are split over DDP ranks.
2. **minima**: the current point and every replica's end point are quenched (L-BFGS on the probe set) and
   added to a persistent :class:`~lightning_landscape.dynamics.MinimaDatabase` (deduplicated in function
   space: outputs on the probe set).
3. **paths**: minimum-energy paths (string method or NEB, climbing image) from the current minimum to the
   previous trigger's, and along the minimum spanning tree of the database's minima where no barrier is known
   yet; whole paths are split over DDP ranks.
4. **Markov state model** of this trigger's replicas: features (the sketches, or the outputs on the probe
   set), k-means, a reversible MSM at ``lag``, implied timescales, Chapman-Kolmogorov test, PCCA+ sets.
5. **disconnectivity graph** of the database.

The work is done in that order, item by item, while the ``budget_passes`` / ``budget_seconds`` last (every rank
follows rank 0's decision); what was spent is logged. Outputs, in ``<run dir>/landscape/energy/`` and W&B:
figures ``disconnectivity``, ``timescales``, ``paths``, ``free_energy``; tables ``minima``, ``barriers``,
``metastable``; scalars ``barrier_previous`` (saddle loss minus the current minimum's loss), ``slowest_timescale``
(in optimizer steps), ``metastable_states``, ``n_minima``, ``new_minima``, ``spent_passes``, ``spent_seconds``;
the minima database in ``minima/`` and every replica as a trajectory store in ``excursions/step-<n>/``.

Example::

    energy = EnergyLandscape(every_n_epochs=5, replicas=8, replica_steps=100, budget_seconds=60)
    trainer = L.Trainer(callbacks=[TrajectoryRecorder(), energy], logger=WandbLogger())
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

from lightning_landscape import distributed
from lightning_landscape.callbacks.base import LandscapeCallback, global_batch_size
from lightning_landscape.checks import check_float, check_int
from lightning_landscape.dynamics import (
    Excursions,
    MinimaDatabase,
    SparseProjection,
    clustered_msm,
    disconnectivity_figure,
    disconnectivity_tree,
    metastable_summary,
    quench,
    sample_basin,
    states_on_plane,
)
from lightning_landscape.geometry.paths import minimum_energy_path
from lightning_landscape.objective import BNMode, LossFn, Objective
from lightning_landscape.params import ParameterLayout
from lightning_landscape.report.plots import free_energy_figure, paths_figure, timescales_figure

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


def _map_style(trainer: pl.Trainer) -> bool:
    loader = trainer.train_dataloader
    dataset = getattr(loader, "dataset", None)
    return hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")


class EnergyLandscape(LandscapeCallback):
    """Basin sampling, minima, minimum-energy paths, a Markov state model and the disconnectivity graph.

    Args:
        every_n_steps, every_n_epochs, at_fit_end: triggers (and :meth:`run_now` on demand).
        replicas: SGD/SGLD replicas per trigger.
        replica_steps: steps per replica.
        lr: their learning rate (default: the first optimizer's current learning rate).
        temperature: SGLD temperature (0: plain SGD, whose noise is the minibatch noise at the training ``lr/B``).
        record_every: record a replica's point every this many steps.
        pool_batches: training batches in the minibatch pool (of the global training batch size).
        quench_iter: L-BFGS iterations per quench.
        dedup_tol: relative output distance under which two minima are one.
        path_images: images per minimum-energy path (ends included).
        path_steps: iterations per path (and for the climbing image).
        path_method: ``"string"`` or ``"neb"``.
        path_lr: the images' first FIRE time step (default: from the curvature at the path's ends, see
            :func:`~lightning_landscape.geometry.paths.minimum_energy_path`).
        max_paths: paths per trigger at most.
        lag: MSM lag time in recorded points (``lag * record_every`` optimizer steps of the replicas).
        n_clusters: MSM states (default: about one per 20 recorded points, 2 to 50).
        features: ``"sketch"`` (sketch coordinates) or ``"outputs"`` (outputs on the probe set, invariant to
            permutations of hidden units) for the MSM.
        max_metastable: PCCA+ sets at most (the number is chosen at the largest eigenvalue gap).
        sketch_dim, projection_seed: the replicas' sketch (a CountSketch); with a :class:`TrajectoryRecorder` in the
            trainer, its projection is used instead, so training trajectories and replicas share one basis.
        budget_passes: batch passes (forward plus backward, summed over ranks) per trigger, or None.
        budget_seconds: wall-clock seconds per trigger, or None.
        seed: seed of the replicas and of the pool of batches.
        probe_size, probe_seed, loss_fn, probe_batches, progress, dtype: as for every callback. With an iterable
            training dataset, the given ``probe_batches`` are also the replicas' minibatch pool.
        bn_mode: ``"train"`` (default): BatchNorm normalizes with the statistics of the probe batch, so the energy is a
            function of the weights alone and a minimum has the same loss at every trigger. ``"eval"`` (running
            statistics) is refused for modules with BatchNorm, whose running statistics move between triggers.
        probe_batch_size: as for every callback, but the default is the whole probe set in one batch.
        outputs_fn: ``outputs_fn(module, batch) -> tensor``, the network's outputs on a probe batch (the function-space
            fingerprint of minima and the ``"outputs"`` features). Default: ``module(first tensor of the batch)``.

    Raises:
        ValueError: for non-positive counts, a negative temperature or budget, or an unknown method or feature.
    """

    name = "energy"
    shard_probe = False  # every rank holds the whole probe set; replicas, quenches and paths are split instead

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        at_fit_end: bool = True,
        replicas: int = 8,
        replica_steps: int = 200,
        lr: float | None = None,
        temperature: float = 0.0,
        record_every: int = 5,
        pool_batches: int = 16,
        quench_iter: int = 100,
        dedup_tol: float = 0.05,
        path_images: int = 9,
        path_steps: int = 100,
        path_method: Literal["string", "neb"] = "string",
        path_lr: float | None = None,
        max_paths: int = 4,
        lag: int = 1,
        n_clusters: int | None = None,
        features: Literal["sketch", "outputs"] = "sketch",
        max_metastable: int = 4,
        sketch_dim: int = 256,
        projection_seed: int = 0,
        budget_passes: int | None = None,
        budget_seconds: float | None = None,
        seed: int = 0,
        probe_size: int = 256,
        probe_batch_size: int | None = None,
        probe_seed: int = 0,
        bn_mode: BNMode = "train",
        loss_fn: LossFn | None = None,
        outputs_fn: LossFn | None = None,
        progress: bool = True,
        dtype: torch.dtype = torch.float32,
        probe_batches: list[Any] | None = None,
    ) -> None:
        check_int("probe_size", probe_size, example=256)  # before it becomes the default probe_batch_size
        super().__init__(
            every_n_steps=every_n_steps,
            every_n_epochs=every_n_epochs,
            at_fit_end=at_fit_end,
            probe_size=probe_size,
            probe_batch_size=probe_batch_size or probe_size,  # one batch: fewer, larger passes
            probe_seed=probe_seed,
            bn_mode=bn_mode,
            loss_fn=loss_fn,
            progress=progress,
            dtype=dtype,
            probe_batches=probe_batches,
        )
        for key, value, example in (
            ("replicas", replicas, 8),
            ("replica_steps", replica_steps, 200),
            ("record_every", record_every, 5),
            ("pool_batches", pool_batches, 16),
            ("quench_iter", quench_iter, 100),
            ("path_steps", path_steps, 100),
            ("lag", lag, 1),
            ("sketch_dim", sketch_dim, 256),
        ):
            check_int(key, value, example=example)
        check_int("path_images", path_images, minimum=3, example=9)
        check_int("max_paths", max_paths, minimum=0, example=4)
        check_int("max_metastable", max_metastable, minimum=2, example=4)
        check_int("n_clusters", n_clusters, minimum=2, optional=True, example=20)
        check_int("budget_passes", budget_passes, optional=True, example=20000)
        check_int("seed", seed, minimum=0, example=0)
        check_int("projection_seed", projection_seed, minimum=0, example=0)
        check_float("dedup_tol", dedup_tol, hint="e.g. 0.05 (5% output distance).")
        check_float("lr", lr, optional=True, hint="None uses the optimizer's lr.")
        check_float("path_lr", path_lr, optional=True, hint="None takes it from the curvature at the path's ends.")
        check_float("temperature", temperature, strict=False, hint="0 is plain SGD, > 0 SGLD.")
        check_float("budget_seconds", budget_seconds, optional=True, hint="None means no limit.")
        if path_method not in ("string", "neb"):
            raise ValueError(f"`path_method` must be 'string' or 'neb', got {path_method!r}. HINT: 'string'.")
        if features not in ("sketch", "outputs"):
            raise ValueError(f"`features` must be 'sketch' or 'outputs', got {features!r}. HINT: 'sketch'.")
        if outputs_fn is not None and not callable(outputs_fn):
            raise ValueError(f"`outputs_fn` must be callable as `outputs_fn(module, batch)`, got {outputs_fn!r}.")
        self.replicas, self.replica_steps, self.lr, self.temperature = replicas, replica_steps, lr, temperature
        self.record_every, self.pool_batches, self.quench_iter, self.dedup_tol = (
            record_every,
            pool_batches,
            quench_iter,
            dedup_tol,
        )
        self.path_images, self.path_steps, self.path_method, self.max_paths = (
            path_images,
            path_steps,
            path_method,
            max_paths,
        )
        self.path_lr = path_lr
        self.lag, self.n_clusters, self.features, self.max_metastable = lag, n_clusters, features, max_metastable
        self.sketch_dim, self.projection_seed, self.seed = sketch_dim, projection_seed, seed
        self.budget_passes, self.budget_seconds = budget_passes, budget_seconds
        self.outputs_fn = outputs_fn
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

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.bn_mode == "eval" and any(isinstance(m, _BatchNorm) for m in pl_module.modules()):
            raise ValueError(
                f"`bn_mode='eval'` on {type(pl_module).__name__}, which has BatchNorm layers: their running statistics"
                " move between triggers, so a stored minimum would have another loss at the next trigger and barriers"
                " between triggers would be artifacts. HINT: use `bn_mode='train'` (the default), where the energy is"
                " a function of the weights alone."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._resumed and trainer.is_global_zero:
            self._carry_minima(trainer.global_step)
        self._resumed = False

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
        super().check(trainer, pl_module)
        objective = self.objective(trainer, pl_module)
        source = "`outputs_fn`" if self.outputs_fn is not None else f"`{type(pl_module).__name__}(batch[0])`"
        try:
            outputs = objective.outputs()
            if not torch.is_tensor(outputs) or not outputs.is_floating_point():
                raise TypeError(f"got {type(outputs).__name__} {getattr(outputs, 'dtype', '')}, not a floating tensor")
        except Exception as err:
            raise RuntimeError(
                f"EnergyLandscape cannot compute the network's outputs on a probe batch ({source}), which fingerprint"
                f" minima in function space: {type(err).__name__}: {err}. HINT: pass"
                " `EnergyLandscape(outputs_fn=lambda module, batch: ...)` returning the outputs as a floating tensor,"
                " e.g. `module(batch['input_ids'])` for dict batches or `module.encoder(batch[0])` for an autoencoder."
            ) from err

    # ------------------------------------------------------------------ budget
    def _passes(self, trainer: pl.Trainer, spend: list[tuple[Objective, int]]) -> int:
        """Batch passes spent this trigger by each objective since its mark, summed over ranks (a collective)."""
        local = sum(_passes(o) - mark for o, mark in spend)
        return int(distributed.reduce_sum(trainer.strategy, torch.tensor(float(local))).item())

    def _may_continue(self, trainer: pl.Trainer, spend: list[tuple[Objective, int]], start: float) -> bool:
        """Rank 0's decision, on every rank: is any budget left?"""
        passes = self._passes(trainer, spend)
        left = (self.budget_passes is None or passes < self.budget_passes) and (
            self.budget_seconds is None or time.perf_counter() - start < self.budget_seconds
        )
        return bool(distributed.broadcast(trainer.strategy, left))

    # ------------------------------------------------------------------ the analysis
    @override
    def stages(self) -> int:
        return 5

    def _projection(self, trainer: pl.Trainer, pl_module: pl.LightningModule, x0: torch.Tensor) -> SparseProjection:
        """The recorder's projection when a TrajectoryRecorder runs (one basis for trajectories and replicas): it
        projects all parameters, so the replicas' trainable ones are sketched with the frozen ones held fixed."""
        from lightning_landscape.callbacks.trajectory import TrajectoryRecorder

        recorder = TrajectoryRecorder.find(trainer)
        if recorder is None:
            return SparseProjection(x0.numel(), self.sketch_dim, self.projection_seed, 1, x0.device)
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
        if self._pool is None and self.given_probe_batches is not None and not _map_style(trainer):
            self._pool = self.probe_set(trainer)  # nothing to draw from: the given batches are the pool
        if self._pool is None:
            self._pool = self.draw_batches(
                trainer, batch_size * self.pool_batches, batch_size, self.seed + 1, sharded=False
            )
        return Objective(pl_module, self._pool, self.loss_fn, bn_mode=self.bn_mode, dtype=self.dtype)

    @override
    def analyze(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        start = self._mark = time.perf_counter()
        self._timings: dict[str, float] = {}
        strategy = trainer.strategy
        rank, world_size = distributed.world(strategy)
        with self.stage(trainer, "objectives"):
            probe = self.objective(trainer, pl_module)
            pool = self._pool_objective(trainer, pl_module)
            spend = [(probe, _passes(probe)), (pool, _passes(pool))]
            lr = self.lr or float(trainer.optimizers[0].param_groups[0]["lr"])
            x0 = probe.theta0
            sketch = self._projection(trainer, pl_module, x0)

        # 1. basin sampling, replicas in rounds of one per rank
        def replicas(ids: list[int]) -> Excursions:
            return sample_basin(
                pool,
                x0,
                ids,
                self.replica_steps,
                lr,
                self.temperature,
                seed=self.seed + step,
                sketch=sketch,
                record_every=self.record_every,
                probe=probe,
            )

        runs = []
        for first in range(0, self.replicas, world_size):
            if not self._may_continue(trainer, spend, start):
                break
            with self.stage(trainer, "basin sampling"):
                if first + rank < self.replicas:
                    runs.append(replicas([first + rank]))
        with self.stage(trainer, "basin sampling"):
            local = Excursions.concatenate(runs) if runs else replicas([])
        excursions = self._gather(strategy, local)
        with self.stage(trainer, "basin sampling"):
            if trainer.is_global_zero and len(excursions.replica_ids):
                layout = {"names": list(probe.layout.names), "shapes": [list(s) for s in probe.layout.shapes]}
                store_meta = {"k": sketch.k, "projection_seed": sketch.seed, "nnz": sketch.nnz, "step": step, **layout}
                excursions.save(self.reporter.run_dir / "excursions" / f"step-{step:09d}", store_meta)
        self.advance("basin sampling")

        # 2. quench the current point and the replicas' ends
        with self.stage(trainer, "minima"):
            candidates = torch.cat([x0[None], excursions.finals.to(x0)])
        quenched = self._quench_all(trainer, probe, candidates, spend, start)
        self.advance("minima")

        # 3. the database (rank 0), then paths
        plan, new_minima, current, db = None, 0, None, None
        with self.stage(trainer, "minima database"):
            if trainer.is_global_zero:
                db, current, new_minima, plan = self._database(probe, quenched, excursions, step)
        plan = distributed.broadcast(strategy, plan)
        paths = []  # whole paths split over ranks, one per rank per round
        for first in range(0, len(plan), world_size):
            if not self._may_continue(trainer, spend, start):
                break
            mine = None
            with self.stage(trainer, "paths"):
                if first + rank < len(plan):
                    i, j, a, b = plan[first + rank]
                    path = minimum_energy_path(
                        probe,
                        a.to(x0),
                        b.to(x0),
                        self.path_images,
                        self.path_method,
                        step_size=self.path_lr,
                        n_steps=self.path_steps,
                        quench_steps=0,
                    )
                    mine = (i, j, path)
            paths += [found for found in distributed.gather_objects(strategy, mine) if found is not None]
        self.advance("paths")
        passes = self._passes(trainer, spend)
        if not trainer.is_global_zero:
            return
        local_mark = _passes(probe)
        scalars: dict[str, float] = {"new_minima": new_minima}
        for i, j, path in paths:
            if not np.isfinite(path.losses).all():
                warnings.warn(
                    f"lightning-landscape: EnergyLandscape at step {step}: the path between minima {i} and {j} has"
                    " non-finite losses and is not recorded. HINT: lower `path_lr`.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            # the highest point of the path, ends included (an end that is not quite a minimum can be highest)
            saddle = max(float(path.losses.max()), db.records[i]["loss"], db.records[j]["loss"])
            info = {
                "step": step,
                "method": path.method,
                "length": path.length,
                "converged": path.converged,
                "force_ratio": path.force_ratio,
                "n_grad": path.n_grad,
            }
            db.set_saddle(
                i,
                j,
                saddle,
                barrier_ij=saddle - db.records[i]["loss"],
                barrier_ji=saddle - db.records[j]["loss"],
                **info,
            )
            for theta, _ in path.intermediate_minima[:2]:  # a dip along the path: quench it, it may be a new minimum
                try:
                    _, new = self._add_minimum(
                        db, probe, *self._quench(probe, theta), step=step, source=f"path {i}-{j}"
                    )
                except ValueError:  # not finite
                    continue
                scalars["new_minima"] += new
        passes += _passes(probe) - local_mark
        if self.previous_minimum is not None and current is not None and current != self.previous_minimum:
            saddle = db.saddles.get((min(current, self.previous_minimum), max(current, self.previous_minimum)))
            if saddle is not None:
                scalars["barrier_previous"] = saddle["saddle"] - db.records[current]["loss"]
        self.previous_minimum = current
        try:
            msm = self._markov_state_model(excursions, scalars)
        except Exception as err:  # too little or disconnected data: the rest of the trigger still stands
            message = f"{type(err).__name__}: {err}"
            warnings.warn(
                f"lightning-landscape: EnergyLandscape could not fit the Markov state model at step {step} ({message});"
                " minima, paths and graph are still reported. HINT: raise `replicas` or `replica_steps`.",
                RuntimeWarning,
                stacklevel=2,
            )
            self.reporter.event("failures", {"step": step, "stage": "markov state model", "error": message})
            msm = None
        self.advance("Markov state model")
        saddles = db.saddle_matrix()
        joined = np.flatnonzero(np.isfinite(saddles).sum(1) > 1)  # minima with at least one known path
        tree = disconnectivity_tree(db.losses[joined], saddles[np.ix_(joined, joined)], joined) if len(joined) else None
        self.advance("disconnectivity graph")
        scalars.update(self._timings)
        scalars.update(
            n_minima=len(db),
            spent_passes=passes,
            spent_seconds=time.perf_counter() - start,
            replicas_run=len(excursions.replica_ids),
            paths_run=len(paths),
            paths_converged=sum(p.converged for _, _, p in paths),
        )
        self.history.append({"step": step, **scalars})
        self._report(step, db, paths, msm, tree, scalars, probe.metadata)

    def _database(self, probe: Objective, quenched: list, excursions: Excursions, step: int) -> tuple:
        """Rank 0: the quenched points into the minima database; ``(database, current minimum, new minima, plan)``."""
        new_minima, current = 0, None
        meta = {**probe.metadata, **self.probe_metadata, "probe_batch_size": self.probe_batch_size}
        names = list(probe.layout.names)
        changed = self.minima_names not in (None, names)
        if changed and self.minima_dir is not None and Path(self.minima_dir).exists():
            warnings.warn(
                f"lightning-landscape: the trainable parameters changed before step {step} (e.g. layers unfrozen);"
                " EnergyLandscape starts a new minima database, since minima of another parameter space cannot be"
                " compared with the old ones.",
                RuntimeWarning,
                stacklevel=2,
            )
            self.minima_dir = None
        if self.minima_dir is None or not Path(self.minima_dir).exists():
            folder = self.reporter.run_dir / "minima"
            self.minima_dir = str(folder if not folder.exists() else folder.with_name(f"minima-step{step}"))
            self.previous_minimum = None
        self.minima_names = names
        db = MinimaDatabase(self.minima_dir, tol=self.dedup_tol, meta=meta)
        rejected = []
        for index, (theta, loss, grad_norm, outputs) in enumerate(quenched):
            source = "training" if index == 0 else f"replica {excursions.replica_ids[index - 1]}"
            try:
                found, new = self._add_minimum(db, probe, theta, loss, grad_norm, outputs, step=step, source=source)
            except ValueError:  # not finite: a diverged replica is no minimum
                rejected.append(source)
                continue
            new_minima += new
            current = found if index == 0 else current
        if rejected:
            warnings.warn(
                f"lightning-landscape: EnergyLandscape at step {step} rejected {len(rejected)} quenched points whose"
                f" loss or parameters are not finite ({', '.join(rejected[:4])}). HINT: lower the replicas' `lr`"
                " or `temperature`.",
                RuntimeWarning,
                stacklevel=2,
            )
        plan = self._plan(db, current)
        plan = [(i, j, torch.from_numpy(db.theta(i)), torch.from_numpy(db.theta(j))) for i, j in plan]
        return db, current, new_minima, plan

    def _gather(self, strategy: Any, local: Excursions) -> Excursions:
        """Every rank's replicas on every rank, sorted by replica id (the 1-process result)."""
        local.finals = local.finals.cpu()  # pickled between ranks: no device indices
        return Excursions.concatenate(distributed.gather_objects(strategy, local))

    @staticmethod
    def _add_minimum(db: MinimaDatabase, probe: Objective, theta, loss, grad_norm, outputs, **info) -> tuple[int, bool]:
        """A quenched point into the database, with its probe accuracy."""
        accuracy = float(probe_accuracy(np.asarray(outputs)[None], probe.batches)[0])
        return db.add(theta, loss, outputs, grad_norm=grad_norm, accuracy=accuracy, **info)

    def _quench(self, probe: Objective, theta: torch.Tensor) -> tuple[np.ndarray, float, float, np.ndarray]:
        """``(minimum, loss, gradient norm, probe outputs)`` reached from ``theta``."""
        q = quench(probe, theta, max_iter=self.quench_iter)
        outputs = probe.outputs(q.theta).reshape(-1).double().cpu().numpy()
        return q.theta.double().cpu().numpy(), q.loss, q.grad_norm, outputs

    def _quench_all(self, trainer: pl.Trainer, probe: Objective, candidates: torch.Tensor, spend: list, start: float):
        """Quench the candidates, one per rank per round, while the budget lasts (the current point always):
        ``(theta, loss, gradient norm, probe outputs)`` of each, on every rank."""
        rank, world_size = distributed.world(trainer.strategy)
        results = []
        for first in range(0, len(candidates), world_size):
            if first > 0 and not self._may_continue(trainer, spend, start):
                break
            mine = None
            with self.stage(trainer, "minima"):
                if first + rank < len(candidates):
                    mine = self._quench(probe, candidates[first + rank])
            results += [r for r in distributed.gather_objects(trainer.strategy, mine) if r is not None]
        return results

    def _plan(self, db: MinimaDatabase, current: int) -> list[tuple[int, int]]:
        """Pairs to join by paths: the current minimum to the previous one, then the spanning tree's gaps."""
        plan = []
        previous = self.previous_minimum
        if (
            previous is not None
            and current is not None
            and previous != current
            and (min(previous, current), max(previous, current)) not in db.saddles
        ):
            plan.append((min(previous, current), max(previous, current)))
        plan += [e for e in db.missing_tree_edges() if e not in plan]
        return plan[: self.max_paths]

    def _markov_state_model(self, excursions: Excursions, scalars: dict[str, float]) -> Any:
        """The MSM of this trigger's replicas: the metastable sets of the basin that training is in now, at the
        training noise (rank 0). None while there are too few points."""
        sketches, losses = list(excursions.sketches), list(excursions.losses)
        outputs = list(excursions.outputs) if excursions.outputs is not None else [None] * len(sketches)
        features = sketches if self.features == "sketch" or excursions.outputs is None else outputs
        fitted = clustered_msm(features, self.lag, self.n_clusters, self.max_metastable, self.seed)
        if fitted is None:
            return None
        msm, dtrajs = fitted
        if len(msm.timescales):
            scalars["slowest_timescale"] = float(msm.timescales[0]) * self.record_every
        scalars["metastable_states"] = len(msm.metastable_populations) if msm.metastable_assignment is not None else 1
        accuracy = [
            probe_accuracy(o, self._probe) if o is not None else np.full(len(values), np.nan)
            for o, values in zip(outputs, losses, strict=True)
        ]
        return {
            "msm": msm,
            "sets": metastable_summary(msm, dtrajs, {"loss": losses, "accuracy": accuracy}),
            "plane": states_on_plane(sketches, dtrajs, msm.active_set),
        }

    def _report(self, step: int, db: MinimaDatabase, paths: list, msm: Any, tree: Any, scalars: dict, meta: dict):
        rep = self.reporter
        rep.scalars(scalars, step)
        rep.table(
            "minima",
            ["id", "loss", "grad_norm", "accuracy", "visits", "step", "source"],
            [
                [
                    r["id"],
                    r["loss"],
                    r.get("grad_norm", np.nan),
                    r.get("accuracy", np.nan),
                    r.get("visits", 1),
                    r.get("step", -1),
                    r.get("source", ""),
                ]
                for r in db.records
            ],
            step,
        )
        rep.table(
            "barriers",
            ["i", "j", "saddle", "barrier_ij", "barrier_ji", "length", "converged", "step"],
            [
                [
                    s["i"],
                    s["j"],
                    s["saddle"],
                    s.get("barrier_ij", np.nan),
                    s.get("barrier_ji", np.nan),
                    s.get("length", np.nan),
                    bool(s.get("converged", False)),
                    s.get("step", -1),
                ]
                for s in db.saddles.values()
            ],
            step,
        )
        if paths:
            rep.figure("paths", paths_figure([(f"{i} - {j}", p.arc, p.losses) for i, j, p in paths]), step)
        if tree is not None:
            rep.figure("disconnectivity", disconnectivity_figure(tree, f"disconnectivity graph at step {step}"), step)
        arrays: dict[str, Any] = {"minima_losses": db.losses, "saddles": db.saddle_matrix()}
        if msm is not None:
            model = msm["msm"]
            rep.figure(
                "timescales",
                timescales_figure(
                    model.its_lags * self.record_every, model.implied_timescales * self.record_every, "replica steps"
                ),
                step,
            )
            centers, points, explained = msm["plane"]
            rep.figure("free_energy", free_energy_figure(centers, model.free_energy, points, explained), step)
            if model.metastable_assignment is not None:
                columns = ["set", "population", "mean_loss", "mean_accuracy", "points"]
                rep.table("metastable", columns, [[row[c] for c in columns] for row in msm["sets"]], step)
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
            "lag_steps": self.lag * self.record_every,
            "temperature": self.temperature,
            "seed": self.seed,
            "features": self.features,
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
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.history = list(state_dict.get("history", []))
        self.previous_minimum = state_dict.get("previous_minimum")
        self.minima_dir = state_dict.get("minima_dir", self.minima_dir)
        self._resumed = True
        self.minima_names = state_dict.get("minima_names", self.minima_names)
