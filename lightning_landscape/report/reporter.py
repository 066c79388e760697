"""Where results go: scalars to every logger, rich media to W&B, every file to the run directory.

A :class:`Reporter` is created once per callback in ``setup`` (on every rank, because
``trainer.log_dir`` is a collective), and only writes and logs on global rank 0.

* ``scalars`` -> ``logger.log_metrics`` of every logger of the Trainer (TensorBoard, CSV, W&B, ...);
* ``figure``  -> a PNG under the run directory, ``wandb.Image`` when a ``WandbLogger`` is present, and
  ``add_figure`` for a TensorBoard logger;
* ``plotly``  -> an interactive HTML file (plotly.js written once beside it), and ``wandb.Plotly``;
* ``table``   -> a CSV file, and ``wandb.Table``;
* ``arrays``  -> an ``.npz`` file with the arrays and their metadata;
* ``artifact``-> a W&B artifact of a file or directory (large arrays, stores).

Each analysis has its own reporter: keys are ``"<prefix>-<analysis>/<name>"`` (``prefix`` default ``landscape``),
e.g. ``landscape-flatness/lambda_max``, so that W&B's automatic workspace, which groups panels by the part of a key
before its first ``/``, shows one section per analysis (``landscape-trajectory``, ``landscape-flatness``,
``landscape-slices``, ``landscape-energy``); files are ``<run dir>/<analysis>/<name>-step<step>.<ext>``, where the
run directory is ``<trainer.log_dir>/landscape`` for a versioned logger (TensorBoard, CSV), with W&B
``<save_dir>/landscape/<run id>``, and otherwise (``logger=False``, MLflow, ...) a new
``<log dir>/landscape/version_<n>`` per run, so that two runs never write into one folder.

Logged values sit on the user's step axis: the step at which Lightning logs the user's own ``self.log`` values of
the current batch (``trainer.fit_loop.epoch_loop._batches_that_stepped``), so that curves overlay exactly.

Example::

    >>> import tempfile, numpy as np
    >>> rep = Reporter(tempfile.mkdtemp(), loggers=[], is_global_zero=True)
    >>> rep.arrays("eigenvalues", step=3, values=np.arange(3)).name
    'eigenvalues-step0000003.npz'
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from lightning_landscape._compat import is_instance

if TYPE_CHECKING:
    import lightning.pytorch as pl


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_./-]", "_", name).strip("/")


def _next_version(folder: Path) -> Path:
    taken = [int(p.name[8:]) for p in folder.glob("version_*") if p.name[8:].isdigit()] if folder.is_dir() else []
    return folder / f"version_{max(taken, default=-1) + 1}"


def run_directory(trainer: pl.Trainer) -> Path:
    """The run's landscape folder (call it on every rank: it is a collective), decided once per trainer:
    ``<trainer.log_dir>/landscape`` for a TensorBoard or CSV logger (their ``log_dir`` is versioned),
    ``<save_dir>/landscape/<run id>`` with a W&B logger, else a new ``<log dir>/landscape/version_<n>``."""
    cached = getattr(trainer, "_landscape_run_dir", None)
    if cached is not None:
        return cached
    log_dir = Path(trainer.log_dir or trainer.default_root_dir)
    first = trainer.loggers[0] if trainer.loggers else None
    wandb_logger = next((lg for lg in trainer.loggers if is_instance(lg, "loggers", "WandbLogger")), None)
    if wandb_logger is not None:
        run_dir = None
        if trainer.is_global_zero:
            run_dir = Path(wandb_logger.save_dir or log_dir) / "landscape" / str(wandb_logger.experiment.id)
        run_dir = trainer.strategy.broadcast(run_dir)
    elif first is not None and (
        is_instance(first, "loggers", "TensorBoardLogger") or is_instance(first, "loggers", "CSVLogger")
    ):
        run_dir = log_dir / "landscape"
    else:  # no logger, or one whose folder is not versioned: a fresh folder of our own
        run_dir = trainer.strategy.broadcast(_next_version(log_dir / "landscape") if trainer.is_global_zero else None)
        if trainer.is_global_zero:
            run_dir.mkdir(parents=True, exist_ok=True)  # claimed now: the next run takes the next version
    trainer._landscape_run_dir = run_dir
    return run_dir


def section(prefix: str, analysis: str) -> str:
    """The key namespace (and W&B section) of an analysis: ``"<prefix>-<analysis>"``, or ``analysis`` alone for an
    empty ``prefix``."""
    return f"{prefix}-{analysis}" if prefix else analysis


def check_prefix(value: Any) -> None:
    """``key_prefix`` must be a string of letters, digits, ``_``, ``.`` or ``-`` (no ``/``: it would split W&B's
    sections)."""
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.-]*", value):
        raise ValueError(
            f"`key_prefix` must be a string of letters, digits, '_', '.' or '-', got {value!r}. HINT: 'landscape'"
            " (keys 'landscape-flatness/lambda_max', ...) or '' (keys 'flatness/lambda_max', ...)."
        )


def logger_step(trainer: pl.Trainer, step: int) -> int:
    """The step at which Lightning logs the user's ``self.log`` values at this moment (``step`` if unknown)."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    value = getattr(loop, "_batches_that_stepped", None)
    return int(value) if isinstance(value, int) else step


class Reporter:
    """Writes results of the analyses; a no-op on every rank but global rank 0.

    Args:
        run_dir: directory for files (created on first write).
        loggers: the Lightning loggers to send scalars (and W&B media) to.
        is_global_zero: whether this process writes.
        namespace: prefix of every logged key.
        progress: show progress bars for long analyses.
        trainer: when given, values are logged at the trainer's logging step (:func:`logger_step`) instead of the
            ``step`` passed in, which still names the files.
    """

    def __init__(
        self,
        run_dir: str | Path,
        loggers: Sequence[Any] = (),
        is_global_zero: bool = True,
        namespace: str = "landscape",
        progress: bool = True,
        trainer: Any = None,
    ) -> None:
        self.trainer = trainer
        self.published: dict[str, float] = {}  # the scalars logged since the last `take_published`
        self.run_dir = Path(run_dir)
        self.loggers = list(loggers)
        self.is_global_zero = is_global_zero
        self.namespace = namespace
        self.show_progress = progress

    @classmethod
    def from_trainer(cls, trainer: pl.Trainer, name: str, progress: bool = True, prefix: str = "landscape") -> Reporter:
        """The reporter of analysis ``name``: keys ``<prefix>-<name>/...`` (:func:`section`), files in
        ``<run dir>/<name>/``.

        Call it on every rank (``trainer.log_dir`` is a collective).
        """
        return cls(
            run_directory(trainer) / name,
            trainer.loggers,
            trainer.is_global_zero,
            section(prefix, name),
            progress,
            trainer=trainer,
        )

    # ----------------------------------------------------------------- helpers
    def key(self, name: str) -> str:
        return f"{self.namespace}/{name}" if self.namespace else name

    def file(self, name: str, step: int | None, suffix: str) -> Path:
        """``<run_dir>/<name>-step<step><suffix>`` (nothing is created)."""
        stem = _safe(name) + ("" if step is None else f"-step{step:07d}")
        return self.run_dir / f"{stem}{suffix}"

    def path(self, name: str, step: int | None, suffix: str) -> Path:
        """:meth:`file`, with its parent directories created."""
        path = self.file(name, step, suffix)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def wandb_loggers(self) -> list[Any]:
        return [lg for lg in self.loggers if is_instance(lg, "loggers", "WandbLogger")]

    def take_published(self) -> dict[str, float]:
        """The scalars logged since the last call (rank 0), e.g. to hand them to ``trainer.callback_metrics``."""
        published, self.published = self.published, {}
        return published

    def log_step(self, step: int) -> int:
        """The step values go to the loggers at: the user's logging step when a trainer is attached."""
        return step if self.trainer is None else logger_step(self.trainer, step)

    def _to_wandb(self, name: str, value_fn: Any, step: int) -> None:
        for lg in self.wandb_loggers:
            lg.log_metrics({self.key(name): value_fn()}, step=self.log_step(step))

    # ----------------------------------------------------------------- sinks
    def scalars(self, metrics: Mapping[str, float], step: int) -> None:
        """Log ``{name: value}`` under the namespace to every logger."""
        if not self.is_global_zero or not metrics:
            return
        values = {self.key(k): float(v) for k, v in metrics.items()}
        self.published.update(values)
        for lg in self.loggers:
            lg.log_metrics(values, step=self.log_step(step))

    def figure(self, name: str, fig: Any, step: int, dpi: int = 110) -> Path | None:
        """Save a matplotlib figure as PNG (and log it to W&B); the figure is closed."""
        import matplotlib.pyplot as plt

        if not self.is_global_zero:
            plt.close(fig)
            return None
        path = self.path(name, step, ".png")
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
        for lg in self.loggers:
            if is_instance(lg, "loggers", "TensorBoardLogger"):
                lg.experiment.add_figure(self.key(name), fig, global_step=self.log_step(step), close=False)
        plt.close(fig)
        if self.wandb_loggers:
            import wandb

            self._to_wandb(name, lambda: wandb.Image(str(path)), step)
        return path

    def plotly(self, name: str, fig: Any, step: int) -> Path | None:
        """Save a plotly figure as interactive HTML (and log it to W&B)."""
        if not self.is_global_zero:
            return None
        path = self.path(name, step, ".html")
        fig.write_html(path, include_plotlyjs="directory")
        if self.wandb_loggers:
            import wandb

            self._to_wandb(name, lambda: wandb.Plotly(fig), step)
        return path

    def table(self, name: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], step: int) -> Path | None:
        """Save a table as CSV (and log it to W&B as a ``wandb.Table``)."""
        if not self.is_global_zero:
            return None
        rows = [list(r) for r in rows]
        path = self.path(name, step, ".csv")
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(columns)
            writer.writerows(rows)
        if self.wandb_loggers:
            import wandb

            self._to_wandb(name, lambda: wandb.Table(columns=list(columns), data=rows), step)
        return path

    def arrays(self, name: str, step: int | None, metadata: Mapping[str, Any] | None = None, **arrays: Any) -> Path:
        """Save arrays (and a JSON ``metadata`` entry) to ``.npz``. Returns the path (also on other ranks)."""
        if not self.is_global_zero:
            return self.file(name, step, ".npz")
        path = self.path(name, step, ".npz")
        payload = {k: np.asarray(v) for k, v in arrays.items()}
        payload["metadata"] = np.asarray(json.dumps(dict(metadata or {}), default=str))
        np.savez(path, **payload)
        return path

    def artifact(self, name: str, path: str | Path, type: str = "landscape") -> None:
        """Log a file or directory to W&B as an artifact (nothing without a W&B logger)."""
        if not self.is_global_zero or not self.wandb_loggers:
            return
        import wandb

        path = Path(path)
        art = wandb.Artifact(_safe(name).replace("/", "-"), type=type)
        if path.is_dir():
            art.add_dir(str(path))
        else:
            art.add_file(str(path))
        for lg in self.wandb_loggers:
            lg.experiment.log_artifact(art)

    def event(self, name: str, record: Mapping[str, Any]) -> None:
        """Append one JSON line to ``<run_dir>/<name>.jsonl`` (failures, budgets, ...)."""
        if not self.is_global_zero:
            return
        path = self.path(name, None, ".jsonl")
        with path.open("a") as fh:
            fh.write(json.dumps(dict(record), default=str) + "\n")

    def progress(self, total: int | None, desc: str) -> tqdm:
        """A progress bar on rank 0 below Lightning's own bars, removed when done."""
        return tqdm(
            total=total,
            desc=desc,
            position=2,
            leave=False,
            dynamic_ncols=True,
            mininterval=0.5,
            disable=not (self.is_global_zero and self.show_progress),
        )
