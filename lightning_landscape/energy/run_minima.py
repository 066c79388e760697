"""The run's minima database across triggers: where it lives, when a new one starts, the previous trigger's
minimum, and how a resumed run continues it."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from lightning_landscape.dynamics.minima import MinimaDatabase


class RunMinima:
    """The minima database of one run, as :class:`~lightning_landscape.EnergyLandscape` keeps it from trigger to
    trigger (rank 0): in ``<run dir>/minima``, a new folder when the trainable parameters or the weight decay
    change (minima of another parameter space or energy cannot be compared with the old ones), with the
    :attr:`previous` trigger's minimum; a resumed run continues the checkpoint's database in its own folder, rolled
    back to the checkpoint's step (:meth:`resume`). Its state goes into checkpoints under the keys it always had.

    Args:
        dedup_tol: the function-space distance below which two minima are one
            (:class:`~lightning_landscape.dynamics.MinimaDatabase`).

    Example::

        >>> import tempfile
        >>> minima = RunMinima(dedup_tol=0.05)
        >>> db = minima.open(Path(tempfile.mkdtemp()), {"l2": 0.0}, ["w"], step=0)
        >>> Path(minima.folder).name, len(db)
        ('minima', 0)
    """

    def __init__(self, dedup_tol: float) -> None:
        self.dedup_tol = dedup_tol
        self.folder: str | None = None  # kept in checkpoints: a resumed run continues the same database
        self.names: list[str] | None = None  # the parameters its minima are vectors of
        self.previous: int | None = None  # the previous trigger's current minimum

    def open(self, run_dir: Path, meta: dict[str, Any], names: list[str], step: int) -> MinimaDatabase:
        """The database for the trigger at ``step``, whose energy is described by ``meta`` (the probe's metadata,
        with ``l2``) on the parameters ``names``: this run's, or a new one where those changed (warned about)."""
        exists = self.folder is not None and Path(self.folder).exists()
        changed = self.names not in (None, names)
        changed = changed or (exists and MinimaDatabase(self.folder).meta.get("l2", 0.0) != meta["l2"])
        if changed and exists:
            warnings.warn(
                f"lightning-landscape: the trainable parameters or the weight decay changed before step {step} (e.g."
                " layers unfrozen); EnergyLandscape starts a new minima database, since minima of another parameter"
                " space or energy cannot be compared with the old ones.",
                RuntimeWarning,
                stacklevel=3,
            )
            self.folder = None
        if self.folder is None or not Path(self.folder).exists():
            folder = run_dir / "minima"
            self.folder = str(folder if not folder.exists() else folder.with_name(f"minima-step{step}"))
            self.previous = None
        self.names = names
        db = MinimaDatabase(self.folder, tol=self.dedup_tol, meta=meta)
        if self.previous is not None and self.previous >= len(db):
            self.previous = None
        return db

    def resume(self, run_dir: Path, step: int) -> None:
        """Continue the checkpoint's database in ``<run_dir>/minima`` (another name if that is taken), rolled back
        to ``step`` (minima and visits of the abandoned timeline are dropped); the checkpoint's folder is only read,
        unless it is this run's own."""
        source = Path(self.folder) if self.folder else None
        target = run_dir / "minima"
        if source is None or not (source / "minima.json").exists():
            self.folder, self.previous = None, None
            return
        if source.resolve() != target.resolve():
            if target.exists():
                target = target.with_name(f"minima-resumed-step{step}")
            MinimaDatabase(source).copy_to(target)
        db = MinimaDatabase(target)
        db.rollback(step)
        self.folder = str(target)
        if self.previous is not None and self.previous >= len(db):
            self.previous = None

    def state_dict(self) -> dict[str, Any]:
        return {"previous_minimum": self.previous, "minima_dir": self.folder, "minima_names": self.names}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.previous = state.get("previous_minimum")
        self.folder = state.get("minima_dir", self.folder)
        self.names = state.get("minima_names", self.names)
