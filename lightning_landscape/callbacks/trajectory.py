"""TrajectoryRecorder: the path of SGD through parameter space, step by step, into a trajectory store.

At every optimizer step (not every batch: gradient accumulation is respected) it records

================================ ==========================================================================
``loss``                         training loss of the step (mean over accumulated batches and over ranks)
``grad_norm``                    ``|g|`` before clipping, after AMP unscaling (``on_before_optimizer_step``)
``update_norm``                  ``|theta_t - theta_{t-1}|``, the step actually taken
``update_cosine``                cosine between consecutive updates (near -1: oscillation across a valley)
``distance``, ``relative_distance`` ``|theta_t - theta_0|`` and ``/ |theta_0|``; per layer in the store
``lr``, ``lr_over_batch``        learning rate of the first parameter group and ``lr / B`` (global batch)
``b_simple``, ``grad_noise_trace`` DDP only: McCandlish et al.'s estimators from per-rank versus global
                                 gradients (EMA-smoothed), and the SGD ``temperature = lr tr(Sigma)/(2Bd)``
================================ ==========================================================================

and a sketch ``R theta_t`` (:class:`~lightning_landscape.dynamics.SparseProjection`, ``sketch_dim``
numbers, memory ``O(P + k)``) every ``sketch_every_n_steps`` steps, full parameter snapshots every
``snapshot_every_n_steps`` steps while they fit in ``disk_budget_mb``.
Everything goes into a :class:`~lightning_landscape.TrajectoryStore` (rank 0 writes; every rank joins the
per-step collective under DDP), flushed every ``flush_every_n_steps`` steps, at checkpoints and at the end,
so a killed process loses at most the steps since the last flush, and a resumed run continues the same
store with no duplicated or missing steps. Scalars go to every logger every ``log_every_n_steps``; at the
end of training a figure (PCA plane of the path coloured by loss, distance and step size versus step) and
the store as a W&B artifact.

Example::

    from lightning_landscape import TrajectoryRecorder, TrajectoryStore
    recorder = TrajectoryRecorder(sketch_dim=256, snapshot_every_n_steps=500)
    trainer = L.Trainer(callbacks=[recorder]); trainer.fit(model, dm)
    store = TrajectoryStore.open(recorder.store_dir)
    store.steps, store.stats["loss"], store.sketches, store.snapshot(store.snapshot_steps[-1])
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from typing_extensions import override

from lightning_landscape import distributed
from lightning_landscape.callbacks.base import ObserverCallback, global_batch_size, record_failure
from lightning_landscape.checks import check_float, check_int
from lightning_landscape.curvature import gradient_norm, two_batch_noise
from lightning_landscape.dynamics import SparseProjection, TrajectoryStore
from lightning_landscape.objective import batch_size_of
from lightning_landscape.params import ParameterLayout
from lightning_landscape.report.logged import Logged
from lightning_landscape.report.plots import trajectory_figure

if TYPE_CHECKING:
    import lightning.pytorch as pl


class _LocalGradNorm:
    """State of the DDP communication hook: the squared norm of this rank's gradient before averaging."""

    def __init__(self) -> None:
        self.sq = 0.0
        self.process_group = None


def _local_norm_allreduce(state: _LocalGradNorm, bucket):
    """DDP's default all-reduce, after adding this rank's squared gradient norm to ``state.sq``."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    state.sq += float(bucket.buffer().double().pow(2).sum())
    return default_hooks.allreduce_hook(state.process_group, bucket)


class TrajectoryRecorder(ObserverCallback):
    """Record the SGD trajectory and its statistics into a trajectory store.

    Args:
        sketch_dim: k, the size of the random projection of the parameters.
        sketch_every_n_steps: sketch every ``n`` optimizer steps.
        vector_stats_every_n_steps: compute the statistics that read the whole parameter vector
            (``update_norm``, ``update_cosine``, ``distance`` and per-layer distances) every ``n`` steps;
            ``loss``, ``grad_norm`` and ``lr`` are recorded at every step. Each costs a few passes over the
            parameters, which on a CPU is comparable to a training step of a small model
            (``scripts/bench_trajectory.py``); ``1`` records them at every step.
        projection_seed: seed of the projection (use the same one to compare runs).
        sketch_nnz: non-zeros per column of the sparse projection.
        snapshot_every_n_steps: full parameter snapshots every ``n`` steps (``None``: only the initial one).
        disk_budget_mb: stop taking snapshots once they would exceed this size.
        flush_every_n_steps: write buffered steps to disk every ``n`` steps.
        store_dir: where the store goes (default ``<run dir>/trajectory/store``).
        noise_ema: EMA factor of the DDP noise-scale estimators.
        log_artifact: log the store to W&B as an artifact at the end of training.
        key_prefix: keys are ``<key_prefix>-trajectory/<name>``, one W&B section; ``""`` gives ``trajectory/<name>``.

    Raises:
        ValueError: for non-positive sizes or intervals (in the constructor).
    """

    name = "trajectory"
    section = "trajectory"
    #: what it logs (the dashboard's panels): per-step statistics, the store's size, the end-of-training figure
    logged = Logged(
        scalars=(
            "loss",
            "grad_norm",
            "update_norm",
            "update_cosine",
            "distance",
            "relative_distance",
            "lr",
            "lr_over_batch",
            "b_simple",
            "grad_noise_trace",
            "true_grad_sq",
            "temperature",
            "disk_mb",
            "failures",
        ),
        media=("trajectory",),
    )

    def __init__(
        self,
        sketch_dim: int = 256,
        sketch_every_n_steps: int = 50,
        vector_stats_every_n_steps: int = 100,
        projection_seed: int = 0,
        sketch_nnz: int = 1,
        snapshot_every_n_steps: int | None = 500,
        disk_budget_mb: float = 512.0,
        flush_every_n_steps: int = 100,
        store_dir: str | None = None,
        noise_ema: float = 0.95,
        log_artifact: bool = True,
        key_prefix: str = "landscape",
    ) -> None:
        super().__init__(key_prefix)
        check_int("sketch_dim", sketch_dim, example=256)
        check_int("sketch_every_n_steps", sketch_every_n_steps, example=50)
        check_int("vector_stats_every_n_steps", vector_stats_every_n_steps, example=100)
        check_int("flush_every_n_steps", flush_every_n_steps, example=100)
        check_int("snapshot_every_n_steps", snapshot_every_n_steps, optional=True, example=500)
        check_int("sketch_nnz", sketch_nnz, example=1)
        check_int("projection_seed", projection_seed, minimum=0, example=0)
        if sketch_dim % sketch_nnz:
            raise ValueError(
                f"`sketch_dim` ({sketch_dim}) must be a multiple of `sketch_nnz` ({sketch_nnz}). HINT: e.g. 256 and 1."
            )
        check_float("disk_budget_mb", disk_budget_mb, strict=False, hint="0 keeps only the initial snapshot.")
        check_float("noise_ema", noise_ema, strict=False, hint="a factor in [0, 1), e.g. 0.95.")
        if not noise_ema < 1:
            raise ValueError(f"`noise_ema` must be in [0, 1), got {noise_ema}. HINT: e.g. 0.95.")
        if store_dir is not None and (not isinstance(store_dir, (str, Path)) or not str(store_dir).strip()):
            raise ValueError(
                f"`store_dir` must be a non-empty path or None, got {store_dir!r} (an empty path would write into the"
                " current directory). HINT: None puts the store in `<run dir>/trajectory/store`."
            )
        self.sketch_dim, self.sketch_every_n_steps = sketch_dim, sketch_every_n_steps
        self.vector_stats_every_n_steps = vector_stats_every_n_steps
        self.projection_seed, self.sketch_nnz = projection_seed, sketch_nnz
        self.snapshot_every_n_steps, self.disk_budget_mb = snapshot_every_n_steps, disk_budget_mb
        self.flush_every_n_steps, self.store_dir = flush_every_n_steps, store_dir
        self._given_store_dir = str(store_dir) if store_dir is not None else None
        self.noise_ema, self.log_artifact = noise_ema, log_artifact
        self.store: TrajectoryStore | None = None
        self._last_step: int | None = None
        self._resume_step: int | None = None
        self._copies: dict[int, torch.Tensor] = {}  # parameters at the steps before the next sampled step
        self._noise_state: dict[str, float] = {}
        self._hook_state: _LocalGradNorm | None = None
        self._active = False

    # ------------------------------------------------------------------ state
    @override
    def identity(self) -> dict[str, Any]:
        return {"projection_seed": self.projection_seed, "sketch_dim": self.sketch_dim}  # as in older checkpoints

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "store_dir": self.store_dir,
            "last_step": self._last_step,
            "copies": {step: flat.cpu() for step, flat in self._copies.items()},
            "noise": dict(self._noise_state),
            "failures": self.failures,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.store_dir = state_dict.get("store_dir", self.store_dir)
        self._resume_step = state_dict.get("last_step")
        self._copies = dict(state_dict.get("copies", {}))
        self._noise_state = dict(state_dict.get("noise", {}))
        self.failures = state_dict.get("failures", 0)

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self.plan_memory(ParameterLayout.from_module(pl_module, trainable_only=False).numel, pl_module.device)

    @override
    def reset(self) -> None:
        """A new fit starts a new store; a checkpoint's state (loaded after setup) turns it into a resume."""
        super().reset()
        self.store_dir, self.store = self._given_store_dir, None
        self._last_step = self._resume_step = None
        self._copies, self._noise_state = {}, {}

    def plan_memory(self, n_params: int, device: torch.device) -> None:
        """Before training: rank 0 holds the initial parameters and the two steps before the next sampled one, and
        reads the current ones (4 vectors of ``P`` float32 entries). On an accelerator without room for them in half
        of its free memory they are held in host memory (a warning says so); where the host has no room either, the
        recorder is refused with the sizes."""
        from lightning_landscape.curvature.memory import check_vectors, vectors_that_fit

        self._hold = device
        if device.type != "cpu" and vectors_that_fit(n_params, torch.float32, device) < 4:
            self._hold = torch.device("cpu")
            warnings.warn(
                f"TrajectoryRecorder: 4 parameter vectors of {n_params:,} entries do not fit in half of the free memory"
                f" of {device}; the initial parameters and the recent steps are held in host memory (slower vector"
                " statistics, no device memory).",
                UserWarning,
                stacklevel=2,
            )
        check_vectors(
            4 if self._hold == device else 3,
            n_params,
            torch.float32,
            self._hold,
            f"TrajectoryRecorder on {n_params:,} parameters (the initial point, two recent steps, the current one)",
            "leave TrajectoryRecorder out of this run, or train on a machine with more memory.",
        )

    # ------------------------------------------------------------------ what other callbacks reuse
    def projection_for(self, pl_module: pl.LightningModule, theta: torch.Tensor) -> SparseProjection:
        """Its projection, which sketches all parameters, restricted to the module's trainable ones at ``theta``'s
        device and dtype with the frozen ones held at their values: one sketch basis for the trajectory and for
        points of the trainable parameters (e.g. EnergyLandscape's replicas)."""
        everything = ParameterLayout.from_module(pl_module, trainable_only=False)
        full = SparseProjection(everything.numel, self.sketch_dim, self.projection_seed, self.sketch_nnz, theta.device)
        trainable = [everything.slices()[n] for n in ParameterLayout.from_module(pl_module).names]
        positions = torch.cat([torch.arange(s.start, s.stop) for s in trainable]).to(theta.device)
        flat = torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()]).to(theta)
        return full.restricted(positions, flat)

    def snapshots_before(self, step: int) -> list[tuple[int, int | str]]:
        """``(step, name)`` of the stored parameter snapshots taken before ``step``, the initial one first."""
        if self.store is None:
            return []
        snapshots: list[tuple[int, int | str]] = [(s, s) for s in self.store.snapshot_steps if s < step]
        if not (snapshots and snapshots[0][0] == 0) and (self.store.path / "snapshots" / "init.npy").exists():
            snapshots.insert(0, (0, "init"))
        return snapshots

    def trainable_snapshot(self, name: int | str, pl_module: pl.LightningModule) -> np.ndarray | None:
        """The module's trainable parameters in snapshot ``name`` (None when the module has changed since)."""
        flat = torch.from_numpy(np.array(self.store.snapshot(name)))  # a copy: the stored file stays read-only
        everything = ParameterLayout.from_module(pl_module, trainable_only=False)
        if flat.shape != (everything.numel,):
            return None
        return everything.select(flat, ParameterLayout.from_module(pl_module)).numpy()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._active = not trainer.fast_dev_run
        if not self._active:
            return
        # every parameter, frozen ones too: layers unfrozen later (BaseFinetuning) are on the path from the start,
        # and a frozen parameter simply does not move
        self.layout = ParameterLayout.from_module(pl_module, trainable_only=False)
        self._params = list(pl_module.parameters())
        self._accumulation = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        self._warned_no_loss = False
        flat = self._flat()
        self.projection = SparseProjection(
            self.layout.numel, self.sketch_dim, self.projection_seed, self.sketch_nnz, flat.device
        )
        hold = getattr(self, "_hold", flat.device)
        self._copies = {step: c.to(hold) for step, c in self._copies.items()}
        if self._resume_step is None:
            self._copies = {0: flat.to(hold)}
        self._losses: list[torch.Tensor] = []  # this step's (accumulated) batch losses, kept as tensors
        self._samples = 0  # this step's samples on this rank
        self._device = flat.device
        self._grad_norm: torch.Tensor | float = float("nan")
        self._batch_size = global_batch_size(trainer)
        if self._resume_step is not None:
            self._last_step = self._resume_step
        error = None
        if trainer.is_global_zero:
            try:
                self.store_dir = self._place_store()
            except ValueError as err:
                error = err
        if distributed.agree(trainer.strategy, error, "TrajectoryRecorder's store") is not None:
            raise error or RuntimeError("TrajectoryRecorder: rank 0 refused the store folder (see its error).")
        if trainer.is_global_zero:
            meta = {
                "k": self.sketch_dim,
                "projection_seed": self.projection_seed,
                "nnz": self.sketch_nnz,
                "names": list(self.layout.names),
                "shapes": [list(s) for s in self.layout.shapes],
                "n_params": self.layout.numel,
                "world_size": trainer.world_size,
            }
            self.store = TrajectoryStore.create(self.store_dir, meta)
            if self._resume_step is not None:
                self.store.truncate_after(self._resume_step)
            init_path = Path(self.store_dir) / "snapshots" / "init.npy"
            if not init_path.exists():
                self.store.save_snapshot("init", flat.cpu().numpy())
            self._init = torch.from_numpy(np.array(self.store.snapshot("init"))).to(hold)
            self._init_norm = float(self._init.norm())
        self._register_ddp_hook(trainer)

    def _place_store(self) -> str:
        """The store folder of this run: the given ``store_dir``, or ``<run dir>/store``. A resumed run carries the
        checkpoint's store into it (up to the checkpoint's step) and only reads the checkpoint's folder, so a
        checkpoint never decides where we write or delete."""
        if self._resume_step is None:
            return self._fresh_store_dir()
        source = Path(self.store_dir) if self.store_dir else None
        target = Path(self._given_store_dir) if self._given_store_dir else self.reporter.run_dir / "store"
        if source is not None and source.resolve() == target.resolve():
            return str(target)  # this run's own folder (a given store_dir, a run resumed under its id): truncated
        target = Path(self._fresh_store_dir())
        existed = target.exists()
        try:
            meta = json.loads((source / "meta.json").read_text())
            TrajectoryStore(source, meta).copy_to(target, self._resume_step)
        except Exception as err:
            if not existed:
                shutil.rmtree(target, ignore_errors=True)  # our own half-made copy, nothing else
            warnings.warn(
                f"lightning-landscape: the checkpoint's trajectory store ({source}) cannot be carried over"
                f" ({type(err).__name__}: {err}); the resumed run records into a new store from step"
                f" {self._resume_step}.",
                RuntimeWarning,
                stacklevel=2,
            )
        return str(target)

    def _fresh_store_dir(self) -> str:
        """Where a new (not resumed) run records: never into another run's store."""
        if self._given_store_dir is not None:
            if (Path(self._given_store_dir) / "meta.json").exists():
                raise ValueError(
                    f"`store_dir` {self._given_store_dir!r} already holds the trajectory store of another run,"
                    " and this run does not resume from that run's checkpoint. HINT: pass a new `store_dir`,"
                    " or `store_dir=None` for a folder in this run's directory, or resume with `ckpt_path=`."
                )
            return self._given_store_dir
        path, n = self.reporter.run_dir / "store", 1
        while (path / "meta.json").exists():  # e.g. a W&B run resumed by id without a checkpoint
            path, n = self.reporter.run_dir / f"store-{n}", n + 1
        return str(path)

    def _register_ddp_hook(self, trainer: pl.Trainer) -> None:
        if trainer.world_size < 2 or not hasattr(trainer.strategy.model, "register_comm_hook"):
            return
        state = _LocalGradNorm()
        try:
            trainer.strategy.model.register_comm_hook(state, _local_norm_allreduce)
            self._hook_state = state
        except (RuntimeError, ValueError) as err:  # e.g. the user registered a hook of their own
            record_failure(self.reporter, self, err, trainer.global_step, self.failures + 1)

    def _flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self._params]).float()

    # ------------------------------------------------------------------ per step
    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if not self._active:
            return
        try:
            self._grad_norm = gradient_norm([p.grad for p in self._params if p.grad is not None])
        except Exception as err:  # a per-step hook must never stop training either
            self._grad_norm = math.nan
            self._fail(trainer, err)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._active:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        self._samples += batch_size_of(batch)
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            # Lightning hands over the loss divided by accumulate_grad_batches: undo it
            self._losses.append(loss.detach().reshape(()) * self._accumulation)
        elif not pl_module.automatic_optimization and not self._warned_no_loss:
            self._warned_no_loss = True
            if trainer.is_global_zero:
                warnings.warn(
                    f"lightning-landscape: {type(pl_module).__name__}.training_step (manual optimization) returns no"
                    " loss, so TrajectoryRecorder records `loss` as NaN. HINT: return the loss to record, a scalar"
                    " tensor or {'loss': ...} (Lightning ignores it under manual optimization).",
                    RuntimeWarning,
                    stacklevel=2,
                )
        step = trainer.global_step
        if step == self._last_step or step == 0:
            return  # accumulating gradients: no optimizer step yet
        self._last_step = step
        stats = self._step_numbers(trainer)  # every rank, one collective under DDP, never raises
        if step % max(trainer.log_every_n_steps, 1) == 0:  # the same numbers on every rank: for other callbacks
            for key, value in stats.items():
                value = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
                trainer.callback_metrics[self.reporter.key(key)] = value.detach().float().to(self._device)
        if trainer.is_global_zero:
            self._record(trainer, step, stats)

    def _fail(self, trainer: pl.Trainer, err: BaseException) -> None:
        self._record_failure(err, trainer.global_step)

    def _step_numbers(self, trainer: pl.Trainer) -> dict[str, Any]:
        """Loss, gradient norm, learning rate and the DDP noise estimators of this step. Every rank joins the one
        collective of the step whatever fails locally (it then contributes NaN), so no rank waits for another."""
        losses, self._losses = self._losses, []
        samples, self._samples = self._samples, 0
        local_sq = self._hook_state.sq if self._hook_state else 0.0
        if self._hook_state is not None:
            self._hook_state.sq = 0.0
        stats: dict[str, Any] = {"loss": math.nan, "grad_norm": self._grad_norm}  # numbers or 0-d tensors
        try:
            if losses:
                stats["loss"] = losses[0] if len(losses) == 1 else torch.stack(losses).double().mean()
            group = trainer.optimizers[0].param_groups[0] if trainer.optimizers else {}
            stats["lr"] = float(group.get("lr", math.nan))
        except Exception as err:
            self._fail(trainer, err)
        batch = self._batch_size
        if trainer.world_size > 1:  # every rank joins this one collective per step
            try:
                mine = [float(stats["loss"]), local_sq, 1.0 / samples if samples else math.nan]
            except Exception as err:
                mine = [math.nan, math.nan, math.nan]
                self._fail(trainer, err)
            total = distributed.reduce_sum(
                trainer.strategy, torch.tensor(mine, dtype=torch.float64, device=self._device)
            )
            loss, mean_local_sq, inverse_sizes = (total / trainer.world_size).tolist()
            stats["loss"] = loss
            if self._hook_state is not None:
                try:
                    stats.update(self._noise_scale(mean_local_sq, inverse_sizes, trainer.world_size, stats.get("lr")))
                except Exception as err:
                    self._fail(trainer, err)
        if batch and "lr" in stats:
            stats["lr_over_batch"] = stats["lr"] / batch
        return stats

    def _record(self, trainer: pl.Trainer, step: int, stats: dict[str, Any]) -> None:
        """Rank 0: the row of this step into the store. A failing part (sketch, vector statistics, snapshot, flush,
        logging) is recorded as a failure and leaves the rest of the row, and training, alone."""
        n = self.vector_stats_every_n_steps
        sampled = step % n == 0
        sketched = step % self.sketch_every_n_steps == 0
        keep = (step + 1) % n == 0 or (step + 2) % n == 0 or n == 1  # theta_{T-1}, theta_{T-2} of the next T
        flat = layer = sketch = None
        try:
            if sampled or sketched or keep:  # the whole-vector work, on a few steps only
                with torch.no_grad():
                    flat = self._flat()
                    if sampled:
                        layer = self._vector_stats(flat, step, stats)
                    if keep or sampled:
                        self._copies = {s: c for s, c in self._copies.items() if s > step - 2}
                    if keep:
                        self._copies[step] = flat.to(self._init.device)
                    if sketched:
                        sketch = self.projection(flat).cpu().numpy()
        except Exception as err:
            sketch = layer = None
            self._fail(trainer, err)
        for key in ("update_norm", "update_cosine", "distance", "relative_distance"):  # a column from the first row
            stats.setdefault(key, float("nan"))
        try:
            self.store.append(step, stats, sketch, layer)
            if self.snapshot_every_n_steps and step % self.snapshot_every_n_steps == 0:
                flat = self._flat() if flat is None else flat
                size_mb = (self.store.disk_bytes(("snapshots",)) + 4 * flat.numel()) / 2**20
                if size_mb <= self.disk_budget_mb:
                    self.store.save_snapshot(step, flat.cpu().numpy())
            if step % self.flush_every_n_steps == 0:
                self.store.flush()
        except Exception as err:
            self._fail(trainer, err)
        if step % max(trainer.log_every_n_steps, 1) == 0:
            try:
                values = {k: float(v) for k, v in stats.items()}
                self.reporter.scalars({k: v for k, v in values.items() if math.isfinite(v)}, step)
            except Exception as err:
                self._fail(trainer, err)

    def _vector_stats(self, flat: torch.Tensor, step: int, stats: dict[str, float]) -> np.ndarray:
        """Update norm, cosine of consecutive updates and distances from init at a sampled step (in place), one
        parameter tensor at a time: the working memory is that of the largest tensor, not of the whole vector."""
        before, before2 = self._copies.get(step - 1), self._copies.get(step - 2)
        flat = flat.to(self._init.device)  # host memory where the device has no room (plan_memory)
        sizes = self.layout.sizes
        update_sq = previous_sq = dot = 0.0
        if before is not None:
            pairs = zip(flat.split(sizes), before.split(sizes), strict=True)
            olders = before2.split(sizes) if before2 is not None else [None] * len(sizes)
            for (now, last), older in zip(pairs, olders, strict=True):
                update = now - last
                update_sq += float(update.norm()) ** 2
                if older is not None:
                    previous = last - older
                    previous_sq += float(previous.norm()) ** 2
                    dot += float(torch.dot(update.reshape(-1), previous.reshape(-1)))
            stats["update_norm"] = math.sqrt(update_sq)
            if before2 is not None:
                denom = math.sqrt(update_sq * previous_sq)
                stats["update_cosine"] = dot / denom if denom > 0 else float("nan")
        layers = zip(flat.split(sizes), self._init.split(sizes), strict=True)
        layer = np.array([float((now - init).norm()) for now, init in layers])
        stats["distance"] = float(np.sqrt(np.square(layer).sum()))
        stats["relative_distance"] = stats["distance"] / self._init_norm if self._init_norm > 0 else float("nan")
        return layer

    def _noise_scale(self, mean_local_sq: float, inverse_size: float, world: int, lr: float | None) -> dict[str, float]:
        """McCandlish et al. (2018), appendix A: unbiased |G|^2 and tr(Sigma) from the per-rank and the averaged
        gradient, with the real per-rank batch sizes (:func:`~lightning_landscape.curvature.two_batch_noise`),
        EMA-smoothed."""
        big_sq = float(self._grad_norm) ** 2
        g2, trace = two_batch_noise(mean_local_sq, big_sq, inverse_size, world)
        beta, st = self.noise_ema, self._noise_state
        st["g2"] = beta * st.get("g2", g2) + (1 - beta) * g2
        st["trace"] = beta * st.get("trace", trace) + (1 - beta) * trace
        out = {"grad_noise_trace": st["trace"], "true_grad_sq": st["g2"]}
        out["b_simple"] = st["trace"] / st["g2"] if st["g2"] > 0 else float("nan")
        if lr is not None and self._batch_size:
            out["temperature"] = lr * st["trace"] / (2 * self._batch_size * self.layout.numel)
        return out

    # ------------------------------------------------------------------ durability and the end
    def flush(self) -> None:
        """Write buffered steps to the store now (rank 0)."""
        if self.store is not None:
            self.store.flush()

    def _safe_flush(self, trainer: pl.Trainer) -> None:
        try:
            self.flush()
        except Exception as err:  # e.g. a full disk: the rows stay buffered for the next flush
            self._fail(trainer, err)

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._safe_flush(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._safe_flush(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active or not trainer.is_global_zero or self.store is None:
            return
        step = trainer.global_step
        try:
            self.flush()
            store = TrajectoryStore.open(self.store_dir)
            if len(store.steps):
                self.reporter.figure("trajectory", trajectory_figure(store), step)
            self.reporter.scalars({"disk_mb": store.disk_bytes() / 2**20}, step)
            if self.log_artifact:
                self.reporter.artifact("trajectory-store", self.store_dir, type="trajectory")
        except Exception as err:
            self._fail(trainer, err)
