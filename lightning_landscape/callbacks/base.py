"""The base of every lightning-landscape callback: when to run, on which data, leaving no trace.

A :class:`LandscapeCallback` decides *when* an analysis runs (every ``n`` optimizer steps, every ``n``
epochs, at the end of training, or on demand with :meth:`LandscapeCallback.run_now`), draws a fixed
probe set from the training data once (seeded, recorded), runs the subclass's :meth:`analyze` inside
:func:`~lightning_landscape.guard.preserve_state`, and reports through a
:class:`~lightning_landscape.report.Reporter`.

Guarantees:

* the decision to run depends only on ``trainer.global_step`` / ``current_epoch``, so every DDP rank
  makes the same decision and joins the same collectives;
* parameters, buffers, gradients, optimizer state, train/eval flags and RNG streams are exactly as
  before the analysis;
* an exception inside an analysis never stops training: it is warned about, appended to
  ``<run dir>/<name>/failures.jsonl`` and counted in the scalar ``<prefix>-<name>/failures``.

The class derives from the ``Callback`` of every installed Lightning namespace, so the same callback
object works in a ``lightning.pytorch.Trainer`` and in a ``pytorch_lightning.Trainer``.

Example::

    >>> class PrintLoss(LandscapeCallback):
    ...     name = "printloss"
    ...     def analyze(self, trainer, pl_module, step):
    ...         self.reporter.scalars({"loss": self.objective(trainer, pl_module).loss()}, step)
    >>> cb = PrintLoss(every_n_steps=100)  # then: Trainer(callbacks=[cb])
"""

from __future__ import annotations

import math
import time
import traceback
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_landscape import budget as clock
from lightning_landscape import distributed, sharding
from lightning_landscape._compat import CALLBACK_BASES
from lightning_landscape.budget import Budget
from lightning_landscape.checks import check_int
from lightning_landscape.guard import preserve_state
from lightning_landscape.objective import BNMode, Objective, batch_size_of
from lightning_landscape.params import ParameterLayout
from lightning_landscape.probe import ProbeSpec, probe_chunks
from lightning_landscape.report import Reporter
from lightning_landscape.report.logged import Logged
from lightning_landscape.report.reporter import check_prefix

if TYPE_CHECKING:
    import lightning.pytorch as pl


def record_failure(reporter: Reporter, owner: object, err: BaseException, step: int, count: int) -> None:
    """Warn (rank 0), append to ``<run dir>/<name>/failures.jsonl`` and log ``<prefix>-<name>/failures``.

    Never raises: when the record itself cannot be written (a full disk, a logger that fails), that is warned about
    too, and training goes on. A failure with the same message as an earlier one is recorded without a new warning.
    """
    message = f"{type(err).__name__}: {err}"
    seen = owner.__dict__.setdefault("_warned_failures", set())
    unrecorded = ""
    try:
        trace = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        reporter.event("failures", {"step": step, "error": message, "traceback": trace})
        reporter.scalars({"failures": count}, step)
    except Exception as write_error:
        unrecorded = f" (It could not be recorded either: {type(write_error).__name__}: {write_error}.)"
    if reporter.is_global_zero and message not in seen:  # the same failure again (a full disk) is counted, not warned
        seen.add(message)
        warnings.warn(
            f"lightning-landscape: {type(owner).__name__} failed at step {step} and was skipped;"
            f" training goes on. {message}{unrecorded}",
            RuntimeWarning,
            stacklevel=3,
        )


def global_batch_size(trainer: pl.Trainer) -> int | None:
    """Samples per optimizer step over all ranks: loader batch size x world size x accumulated batches."""
    size = getattr(trainer.train_dataloader, "batch_size", None)
    return size * trainer.world_size * trainer.accumulate_grad_batches if size else None


class ObserverCallback(*CALLBACK_BASES):  # type: ignore[misc]
    """The base of every lightning-landscape callback: its name and W&B section, its reporter, its failure record
    and its checkpoint identity. :class:`LandscapeCallback` adds triggers, the probe set and the budget;
    :class:`~lightning_landscape.TrajectoryRecorder`, which works at every step, derives from this one directly.

    Args:
        key_prefix: the logged keys are ``<key_prefix>-<section>/<name>``, one W&B section per analysis; ``""``
            gives ``<section>/<name>``.
        progress: show a progress bar for long analyses (rank 0).
    """

    name = "observer"
    #: the W&B section and run-directory folder (keys ``<key_prefix>-<section>/<name>``); a subclass that does not
    #: set it gets its ``name``
    section = "observer"
    #: what it logs (:class:`~lightning_landscape.report.logged.Logged`), for the dashboard
    logged = Logged(scalars=("failures",))
    #: run under FSDP2 (``ModelParallelStrategy`` with ``fully_shard``), gathering the full parameters on every rank
    #: at each trigger (:mod:`~lightning_landscape.sharding`); the others refuse sharded strategies in ``setup``
    gathers_fsdp2 = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "section" not in cls.__dict__:
            cls.section = cls.name

    def __init__(self, key_prefix: str = "landscape", progress: bool = True) -> None:
        super().__init__()
        check_prefix(key_prefix)
        self.key_prefix = key_prefix
        self.progress = progress
        self.failures = 0
        self.reporter = Reporter(".", is_global_zero=False)

    @classmethod
    def find(cls, trainer: pl.Trainer) -> Any:
        """The trainer's callback of this class, if it has one (other callbacks reuse the recorder's snapshots)."""
        return next((c for c in trainer.callbacks if isinstance(c, cls)), None)

    def identity(self) -> dict[str, Any]:
        """What tells two callbacks of this class apart in a checkpoint (:attr:`state_key`)."""
        return {"name": self.name}

    @property
    @override
    def state_key(self) -> str:
        # Lightning reads it at every hook call of every step (profiler labels): build the string once
        if getattr(self, "_state_key", None) is None:
            self._state_key = self._generate_state_key(**self.identity())
        return self._state_key

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """For a fit: a strategy it supports, a module with trainable parameters, the reporter, a fresh state."""
        if stage != "fit":
            return
        distributed.check_strategy(trainer.strategy, type(self).__name__, fsdp2=self.gathers_fsdp2)
        ParameterLayout.from_module(pl_module)  # raises early for a module with nothing to analyze
        self.reporter = Reporter.from_trainer(trainer, self.section, self.progress, self.key_prefix)
        self.reset()  # a checkpoint's state, loaded after setup, turns this into a resume

    def reset(self) -> None:
        """Forget the previous fit (another model, other data): a reused callback starts anew. Subclasses extend it."""
        self.failures = 0

    def _record_failure(self, err: BaseException, step: int) -> None:
        self.failures += 1
        record_failure(self.reporter, self, err, step, self.failures)


class LandscapeCallback(ObserverCallback):
    """Base class: triggers, probe set, state guard, failure handling and reporting.

    Args:
        every_n_steps: run after every ``n``-th optimizer step (``None``: never by step).
        every_n_epochs: run at the end of every ``n``-th training epoch (``None``: never by epoch).
        at_fit_end: run once more when training ends.
        probe: the probe set and the energy on it (:class:`~lightning_landscape.probe.ProbeSpec`, or a dict of its
            fields): size, batch size, seed, BatchNorm mode, dtype, ``loss_fn``, ``outputs_fn``, explicit batches.
            Default: 256 samples drawn with seed 0, in the train loader's batches, float32, the analysis' BatchNorm
            mode, the module's ``training_step`` loss. Recorded with every result.
        progress: show a progress bar for long analyses (rank 0).
        key_prefix: the logged keys are ``<key_prefix>-<analysis>/<name>``, one W&B section per analysis; ``""``
            gives ``<analysis>/<name>``.
        budget: what each trigger may spend (:class:`~lightning_landscape.budget.Budget`): a share of the training
            time (a number, e.g. ``0.05``), a ``Budget`` or a dict of its fields, None for no share limit;
            ``"default"``: the callback's ``default_share``, at least 10 s a trigger. No trigger starts when
            ``Trainer(max_time=...)`` leaves less than the floor or after SIGTERM, and a running one is cut at the
            deadline (every rank together); a skipped trigger is logged (``skipped``) and recorded in
            ``<run dir>/<name>/skipped.jsonl``.

    Raises:
        ValueError: for an invalid trigger, budget or probe specification (in the constructor), and for a
            model without trainable parameters, or with manual optimization and no ``loss_fn`` (in ``setup``).
        RuntimeError: at the start of training, when the loss cannot be evaluated on the probe set (with a
            hint naming the argument that fixes it), before any training step is taken.
    """

    name = "analysis"
    section = "analysis"
    logged = Logged(scalars=("seconds", "budget_seconds", "skipped", "failures"))

    #: split the probe set over DDP ranks (True: curvature, products summed over ranks) or give every rank the
    #: whole probe set (False: work items such as grid points are split instead)
    shard_probe = True
    #: the BatchNorm mode of the energy when the probe specification names none
    default_bn_mode: BNMode = "eval"
    #: the share of training time a trigger may take by default (``budget="default"``)
    default_share = 0.05
    #: whether the analysis counts batch passes (``Budget.passes``)
    counts_passes = False
    #: whether the analysis differentiates the loss (gradients, Hessian-vector products): sparse gradients refused
    needs_gradients = True

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        at_fit_end: bool = True,
        probe: ProbeSpec | dict | None = None,
        progress: bool = True,
        key_prefix: str = "landscape",
        budget: Budget | float | dict | str | None = "default",
    ) -> None:
        super().__init__(key_prefix, progress)
        self.budget = Budget.of(budget, self.default_share)
        if self.budget.passes is not None and not self.counts_passes:
            raise ValueError(
                f"{type(self).__name__} does not count batch passes, so `budget.passes={self.budget.passes}` would do"
                " nothing. HINT: limit it by `budget.share` or `budget.seconds`."
            )
        check_int("every_n_steps", every_n_steps, optional=True, example=100)
        check_int("every_n_epochs", every_n_epochs, optional=True, example=1)
        if every_n_steps is None and every_n_epochs is None and not at_fit_end:
            warnings.warn(
                f"{type(self).__name__} has no trigger (`every_n_steps`, `every_n_epochs` and `at_fit_end` are all"
                " off): it runs only when you call `run_now()`. HINT: e.g. `every_n_steps=500`.",
                UserWarning,
                stacklevel=3,
            )
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.at_fit_end = at_fit_end
        #: the probe set and the energy on it, with this analysis' defaults filled in
        self.probe: ProbeSpec = ProbeSpec.of(probe).resolved(self.default_bn_mode)
        self.runs = 0
        self.skipped = 0
        self._spent = 0.0  # seconds of this fit's triggers
        self._deadline: float | None = None  # the running trigger's end (time.perf_counter())
        self._last_step: int | None = None
        self._probe_batches: list[Any] | None = None
        self._objective: Objective | None = None

    # ----------------------------------------------------------------- to override
    def analyze(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """The analysis. Runs on every rank with grad enabled, inside the state guard."""
        raise NotImplementedError

    def stages(self) -> int | None:
        """How many times :meth:`advance` is called per analysis (the progress bar's total)."""
        return None

    def advance(self, stage: str) -> None:
        """Mark a stage of the analysis as done on the rank-0 progress bar."""
        bar = getattr(self, "_bar", None)
        if bar is not None:
            bar.set_postfix_str(stage, refresh=False)
            bar.update()

    # ----------------------------------------------------------------- identity and state
    @override
    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "every_n_steps": self.every_n_steps, "every_n_epochs": self.every_n_epochs}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"failures": self.failures, "runs": self.runs, "last_step": self._last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.failures = state_dict.get("failures", 0)
        self.runs = state_dict.get("runs", 0)
        self._last_step = state_dict.get("last_step")

    # ----------------------------------------------------------------- data
    @property
    def probe_metadata(self) -> dict[str, Any]:
        """The probe specification as recorded with every result (:attr:`ProbeSpec.metadata`); ``probe_size`` is the
        number of samples actually in the set (summed over ranks when it is sharded: the objective's own
        ``n_samples`` is this rank's share)."""
        size = self._probe_total if getattr(self, "_probe_total", None) else self.probe.size
        return {**self.probe.metadata, "probe_size": size}

    def probe_set(self, trainer: pl.Trainer) -> list[Any]:
        """This rank's share of the fixed probe set, on the module's device (drawn once, then cached).

        The probe set is the first ``probe.size`` samples of a permutation of the training set drawn with
        ``probe.seed``, cut into batches (or the ``probe.batches`` given to the constructor); under DDP each rank
        holds a contiguous block of those batches, so the union over ranks is the same set for any number of ranks.
        """
        given = self.probe.batches
        if self._probe_batches is None and given is not None:
            rank, world_size = distributed.world(trainer.strategy) if self.shard_probe else (0, 1)
            if len(given) < world_size:
                raise ValueError(
                    f"`probe.batches` holds {len(given)} batches but there are {world_size} ranks."
                    " HINT: give at least one batch per rank."
                )
            mine = distributed.shard(len(given), rank, world_size)
            self._probe_total = sum(batch_size_of(b) for b in given)
            self._probe_batches = [trainer.strategy.batch_to_device(given[j]) for j in mine]
        if self._probe_batches is None:
            self._probe_batches = self.draw_batches(
                trainer, self.probe.size, self.probe.batch_size, self.probe.seed, sharded=self.shard_probe
            )
        return self._probe_batches

    def draw_batches(
        self, trainer: pl.Trainer, size: int, batch_size: int | None, seed: int, sharded: bool
    ) -> list[Any]:
        """``size`` training samples (a permutation drawn with ``seed``) in batches of ``batch_size`` (default: the
        train loader's), collated by the train loader and moved to the module's device; with ``sharded``, only
        this rank's contiguous block of the batches."""
        loader = trainer.train_dataloader
        if isinstance(loader, dict):
            loader = next(iter(loader.values()))
        if isinstance(loader, (list, tuple)):
            loader = loader[0]
        if not isinstance(loader, DataLoader):
            raise TypeError(
                f"{type(self).__name__} needs a torch DataLoader for training, got {type(loader).__name__}."
            )
        dataset = loader.dataset
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(
                f"{type(self).__name__} draws its probe set by index and needs a map-style training dataset,"
                f" got {type(dataset).__name__}. HINT: pass the probe set explicitly,"
                f" e.g. `{type(self).__name__}(probe={{'batches': [batch_1, batch_2, ...]}})`."
            )
        batch_size = batch_size or loader.batch_size or size
        if size > len(dataset):
            warnings.warn(
                f"{type(self).__name__}: the training set has {len(dataset)} samples, fewer than the {size} asked for;"
                f" the probe set is the whole training set (its size is recorded as {len(dataset)}).",
                UserWarning,
                stacklevel=2,
            )
        chunks = probe_chunks(len(dataset), size, batch_size, seed)
        if size == self.probe.size:
            self._probe_total = sum(len(c) for c in chunks)
        module = trainer.lightning_module
        batch_norm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())
        if self.probe.bn_mode == "train" and batch_norm and min(len(c) for c in chunks) < 2:
            raise ValueError(
                f"{type(self).__name__}'s probe set ends in a batch of 1 sample ({size} samples in batches of"
                f" {batch_size}), which BatchNorm cannot normalize with `probe.bn_mode='train'`. HINT: make"
                " `probe.size` a multiple of `probe.batch_size`, or use `probe.bn_mode='eval'`."
            )
        rank, world_size = distributed.world(trainer.strategy) if sharded else (0, 1)
        mine = distributed.shard(len(chunks), rank, world_size)
        if len(chunks) < world_size:
            raise ValueError(
                f"The probe set has {len(chunks)} batches but there are {world_size} ranks."
                f" HINT: raise `probe.size` ({self.probe.size}) or lower `probe.batch_size` ({batch_size})."
            )
        return [trainer.strategy.batch_to_device(loader.collate_fn([dataset[i] for i in chunks[j]])) for j in mine]

    def _stale(self, pl_module: pl.LightningModule) -> bool:
        """Whether the objective must be (re)built: none yet, another module, or other trainable parameters."""
        objective = self._objective
        return (
            objective is None
            or objective.module is not pl_module
            or objective.layout != ParameterLayout.from_module(pl_module)
        )

    def objective(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Objective:
        """The :class:`Objective` of ``pl_module`` on this rank's probe batches (built once, and again when the set of
        trainable parameters changes, e.g. layers unfrozen by ``BaseFinetuning``). Every rank calls it together: under
        FSDP2 it gathers the parameters."""
        if not self._stale(pl_module):
            self._objective.gather()  # under FSDP2, this trigger's parameters (every rank together)
        else:
            spec = self.probe
            self._objective = Objective(
                pl_module,
                self.probe_set(trainer),
                spec.loss_fn,
                bn_mode=spec.bn_mode,
                dtype=spec.dtype,
                outputs_fn=spec.outputs_fn,
            )
        theta = self._objective.theta0
        if not torch.isfinite(theta).all():
            bad = int((~torch.isfinite(theta)).sum())
            raise FloatingPointError(
                f"the parameters are not finite ({bad} of {theta.numel()} entries are NaN or inf): training diverged,"
                " so there is no landscape to measure. HINT: lower the learning rate or clip gradients."
            )
        loss = self._objective.loss(theta)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the loss on the probe set is not finite ({float(loss)}) at finite parameters."
                " HINT: check the loss for log(0) or overflow, or lower the learning rate."
            )
        return self._objective

    # ----------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        super().setup(trainer, pl_module, stage)
        sparse = [n for n, m in pl_module.named_modules() if getattr(m, "sparse", False) is True]
        if sparse and self.needs_gradients:
            raise ValueError(
                f"{type(self).__name__} differentiates the loss twice (Hessian-vector products), which sparse"
                f" gradients do not support, and {sparse[:3]} use `sparse=True`. HINT: `sparse=False` on those"
                " embeddings (the gradients are then dense), or leave this analysis out."
            )
        if self.probe.loss_fn is None and not getattr(pl_module, "automatic_optimization", True):
            raise ValueError(
                f"{type(pl_module).__name__} uses manual optimization: its `training_step` steps the optimizers"
                f" itself, so {type(self).__name__} cannot use it as the loss. HINT: pass the loss to analyze, e.g."
                f" `{type(self).__name__}(probe={{'loss_fn': lambda module, batch: module.generator_loss(batch)}})`."
            )

    def reset(self) -> None:
        super().reset()
        self._objective, self._probe_batches = None, None
        self.runs, self.skipped, self._spent, self._last_step = 0, 0, 0.0, None

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        clock.forget(trainer)  # the next fit's clock starts anew

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        clock.ledger(trainer)  # the fit's clock starts with the first callback's start
        if trainer.fast_dev_run:
            return
        error: BaseException | None = None
        try:
            with preserve_state(pl_module, trainer.optimizers), torch.inference_mode(False), torch.enable_grad():
                self.check(trainer, pl_module)
        except Exception as err:
            error = err
        agreed = distributed.agree(trainer.strategy, error, f"{type(self).__name__} at the start of training")
        if agreed is not None:  # a configuration that cannot work: stop now, on every rank, with this rank's error
            raise error if error is not None else agreed

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before the first training step: the probe set can be drawn and the loss evaluated on it, so that a
        configuration that cannot work fails now, not at the first trigger hours later. Subclasses add their own."""
        given = self.probe.loss_fn is not None
        source = "`probe.loss_fn`" if given else f"`{type(pl_module).__name__}.training_step`"
        hint = (
            "HINT: check `probe.loss_fn`, which is called as `loss_fn(module, batch)` on batches of the train loader."
            if given
            else f"HINT: pass `{type(self).__name__}(probe={{'loss_fn': lambda module, batch: ...}})` returning the"
            " scalar loss."
        )
        sharding.check_gatherable(pl_module, type(self).__name__, self.probe.dtype)
        try:
            self.objective(trainer, pl_module)
        except Exception as err:
            if "probe" in str(err) and "HINT" in str(err):  # the probe set itself: the message names the fix
                raise
            raise RuntimeError(
                f"{type(self).__name__} cannot evaluate the loss ({source}) on its probe set:"
                f" {type(err).__name__}: {err} {hint}"
            ) from err

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self.run_now(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.run_now(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_fit_end:
            self.run_now(trainer, pl_module)

    def run_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Run the analysis at the current step (on every rank). Returns False if it failed or was skipped.

        Runs at most once per optimizer step, and never in ``fast_dev_run`` or the sanity check.
        """
        step = trainer.global_step
        if trainer.sanity_checking or trainer.fast_dev_run or step == self._last_step:
            return False
        self._last_step = step
        allowance = self._allowance(trainer)
        if isinstance(allowance, str):
            self._record_skip(allowance, step)
            return False
        start = time.perf_counter()
        self._deadline, self._trainer_ref = start + allowance, trainer
        error: BaseException | None = None
        try:
            with (
                preserve_state(pl_module, trainer.optimizers),
                torch.inference_mode(False),
                torch.enable_grad(),
                self.reporter.progress(self.stages(), f"lightning-landscape {self.name} @ step {step}") as bar,
            ):
                self._bar = bar
                self.analyze(trainer, pl_module, step)
        except Exception as err:
            error = err
        finally:
            seconds = time.perf_counter() - start
            self._spent += seconds
            clock.ledger(trainer).analysis_seconds += seconds
            self._deadline = self._trainer_ref = None
        # every rank learns whether any failed (also after the last collective), so all skip or go on together
        error = distributed.agree(trainer.strategy, error, f"{type(self).__name__} at step {step}")
        if error is not None:
            self._record_failure(error, step)
            return False
        self.runs += 1
        self.reporter.scalars({"seconds": seconds, "budget_seconds": min(allowance, 1e9)}, step)
        self.publish(trainer, pl_module)
        return True

    def _allowance(self, trainer: pl.Trainer) -> float | str:
        """Rank 0's budget for a trigger starting now, on every rank: seconds, or why none starts."""
        left = clock.max_time_left(trainer)
        if clock.received_sigterm(trainer):
            decision: float | str = "the trainer received SIGTERM"
        elif left is not None and left < max(self.budget.floor, 1.0):
            decision = f"Trainer(max_time) leaves {max(left, 0.0):.1f} s, less than the budget's floor"
        else:
            decision = self.budget.allowance(clock.ledger(trainer).trained(), self._spent)
            decision = decision if left is None else min(decision, left)
        return distributed.broadcast(trainer.strategy, decision)

    def time_left(self) -> float:
        """Seconds left to the running trigger (inf without a limit; 0 once the trainer received SIGTERM). Rank-local:
        a decision taken from it must be rank 0's, broadcast, or taken where rank 0 alone works."""
        if self._deadline is None:
            return math.inf
        if clock.received_sigterm(getattr(self, "_trainer_ref", None)):
            return 0.0
        return self._deadline - time.perf_counter()

    def affordable_probe(self, trainer: pl.Trainer, obj: Objective, per_batch: float, least: int, step: int) -> Any:
        """The probe batches this trigger affords: ``obj`` when ``least`` evaluations of ``per_batch`` seconds on
        each of its batches fit in the time left (or there is no deadline), else its first ``k`` batches (at least
        one), with a ``cut`` event naming them. Rank 0's ``k`` is every rank's (each of its own batches)."""
        left, n = self.time_left(), len(obj.batches)
        k = n if not math.isfinite(left) else max(1, min(n, int(left / (least * max(per_batch, 1e-9)))))
        k = distributed.broadcast(trainer.strategy, k)
        if k < n:
            cut = f"probe set: the first {k} of its {n} batches"
            self.reporter.event("cut", {"step": step, "cut": [cut], "why": "the trigger's budget"})
        return obj.first_batches(k)

    def _record_skip(self, reason: str, step: int) -> None:
        self.skipped += 1
        try:
            self.reporter.event("skipped", {"step": step, "reason": reason})
            self.reporter.scalars({"skipped": self.skipped}, step)
        except Exception as err:  # a record that cannot be written must not stop training
            warnings.warn(f"lightning-landscape: could not record a skipped trigger: {err}", RuntimeWarning, 2)
        if self.reporter.is_global_zero:
            warnings.warn(
                f"lightning-landscape: {type(self).__name__} skipped its trigger at step {step}: {reason}.",
                RuntimeWarning,
                stacklevel=3,
            )

    def publish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Every scalar this analysis logged goes to ``trainer.callback_metrics`` too, on every rank (rank 0's values,
        broadcast), as tensors on the module's device: ``EarlyStopping(monitor="landscape-flatness/trace")`` or
        ``ModelCheckpoint(monitor="landscape-energy/barrier_previous")`` work on any of our measures."""
        values = distributed.broadcast(trainer.strategy, self.reporter.take_published())
        device = pl_module.device
        for key, value in values.items():
            trainer.callback_metrics[key] = torch.tensor(value, dtype=torch.float32, device=device)

    def stage(self, trainer: pl.Trainer, name: str) -> Any:
        """``with self.stage(trainer, "quench"):`` around local work between collectives: a failure on any rank
        makes every rank leave the analysis together (:func:`~lightning_landscape.distributed.agreed`)."""
        return distributed.agreed(trainer.strategy, f"{type(self).__name__} stage {name!r}")
