"""The trajectory store: one append-only, chunked directory of numpy files per run.

Layout::

    <store>/meta.json                          written once: projection seed, k, nnz, parameter names/shapes
    <store>/chunks/<seq>-<first>-<last>.npz    one file per flush: steps, statistics, sketches
    <store>/snapshots/init.npy                 the parameters at initialization (float32)
    <store>/snapshots/step-<step>.npy          full parameter snapshots, within a disk budget

Why numpy shards and not HDF5 or zarr: every file is written to a temporary name and renamed into
place (``os.replace`` is atomic), so a process killed with SIGKILL at any instant leaves a store that
opens and holds every step of every completed flush; an HDF5 file being appended to can be left
corrupt, and zarr would add a dependency for what ``np.savez`` and a rename already give. Chunks are
read back in sequence order; :meth:`TrajectoryStore.truncate_after` drops steps beyond a checkpoint so
that a resumed run continues the store with no duplicated or missing steps.

Example::

    >>> import tempfile, numpy as np
    >>> store = TrajectoryStore.create(tempfile.mkdtemp(), {"k": 2, "projection_seed": 0})
    >>> store.append(1, {"loss": 0.5}, sketch=np.array([1.0, 2.0]))
    >>> store.append(2, {"loss": 0.4}, sketch=np.array([1.5, 2.5]))
    >>> store.flush().name
    '000000-000000001-000000002.npz'
    >>> opened = TrajectoryStore.open(store.path)
    >>> opened.steps.tolist(), opened.stats["loss"].tolist(), opened.sketches.shape
    ([1, 2], [0.5, 0.4], (2, 2))
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

_CHUNK = re.compile(r"^(\d{6})-(\d{9})-(\d{9})\.npz$")


def _atomic_write(path: Path, write: Any) -> None:
    """Write ``path`` through a temporary file and a rename; on any failure (a full disk) the temporary file is
    removed and ``path`` is as it was."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as fh:
            write(fh)
            fh.flush()  # no fsync: the rename is atomic and the page cache outlives a killed process (power loss aside)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _last_occurrences(values: np.ndarray) -> np.ndarray:
    """Indices of the last occurrence of each distinct value, in order of position."""
    _, first_from_end = np.unique(values[::-1], return_index=True)
    return np.sort(len(values) - 1 - first_from_end)


def read_meta(path: Path) -> dict[str, Any]:
    """A store's ``meta.json``, checked: a clear error naming the file when it is corrupt or not a store's."""
    try:
        meta = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not readable JSON ({type(err).__name__}: {err}).") from err
    missing = [k for k in ("k",) if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ValueError(
            f"{path} is not the meta.json of a trajectory store (it lacks {missing}). HINT: pass the folder that"
            " TrajectoryRecorder wrote, or remove the stray file."
        )
    return meta


class TrajectoryStore:
    """Writer and reader of a trajectory directory (see the module docstring).

    After :meth:`open`, the data are numpy arrays: ``steps`` (n,), ``stats`` ({name: (n,)}),
    ``sketch_steps`` (m,) and ``sketches`` (m, k), ``layer_distance`` ((n, L), NaN at steps without
    vector statistics, or None),
    ``snapshot_steps`` and :meth:`snapshot`, and ``meta``.
    """

    def __init__(self, path: str | Path, meta: dict[str, Any]) -> None:
        self.path = Path(path)
        self.meta = meta
        self._rows: list[tuple[int, dict[str, float], np.ndarray | None, np.ndarray | None]] = []
        self._seq = self._next_seq()
        self.steps = np.zeros(0, dtype=np.int64)
        self.stats: dict[str, np.ndarray] = {}
        self.sketch_steps = np.zeros(0, dtype=np.int64)
        self.sketches = np.zeros((0, int(meta.get("k", 0))), dtype=np.float32)
        self.layer_distance: np.ndarray | None = None

    # ------------------------------------------------------------------ creation and reading
    @classmethod
    def create(cls, path: str | Path, meta: Mapping[str, Any]) -> TrajectoryStore:
        """A new store at ``path`` (or the existing one there, continued: its ``meta.json`` must match)."""
        path = Path(path)
        (path / "chunks").mkdir(parents=True, exist_ok=True)
        (path / "snapshots").mkdir(exist_ok=True)
        meta_file = path / "meta.json"
        meta = {"format": "lightning-landscape-trajectory/1", **dict(meta)}
        if meta_file.exists():
            existing = json.loads(meta_file.read_text())
            for key in ("k", "projection_seed", "nnz", "names", "shapes"):
                if key in meta and existing.get(key) != meta[key]:
                    raise ValueError(
                        f"The trajectory store at {str(path)!r} was written with {key}={existing.get(key)!r},"
                        f" not {meta[key]!r}. HINT: record into a new `store_dir`, or keep the same settings."
                    )
            return cls(path, existing)
        _atomic_write(meta_file, lambda fh: fh.write(json.dumps(meta, indent=1, default=str).encode()))
        return cls(path, meta)

    @classmethod
    def open(cls, path: str | Path) -> TrajectoryStore:
        """Read a store written by :class:`~lightning_landscape.TrajectoryRecorder` (complete chunks only).

        ``path`` is the store folder, or any folder above it (a run's ``trainer.log_dir``, a W&B ``save_dir``):
        then the most recently created training store below it is opened. That is how the launching process finds the
        results of a ``ddp_spawn`` run, whose recorder object never learns the folder its spawned copy wrote.
        """
        path = Path(path)
        if not (path / "meta.json").exists() and path.is_dir():
            found = [  # training stores, not the EnergyLandscape replicas' (excursions/)
                m.parent
                for m in path.rglob("meta.json")
                if (m.parent / "chunks").is_dir() and "excursions" not in m.relative_to(path).parts
            ]
            if found:
                path = max(found, key=lambda p: (p / "meta.json").stat().st_mtime)
        if not (path / "meta.json").exists():
            raise FileNotFoundError(
                f"No trajectory store at or below {str(path)!r} (no meta.json). HINT: pass the `store` folder that"
                " TrajectoryRecorder reports (recorder.store_dir), or the run's log folder (trainer.log_dir)."
            )
        store = cls(path, read_meta(path / "meta.json"))
        store._load()
        return store

    def _chunk_files(self) -> list[Path]:
        folder = self.path / "chunks"
        if not folder.exists():
            return []
        return sorted((p for p in folder.iterdir() if _CHUNK.match(p.name)), key=lambda p: p.name)

    def _next_seq(self) -> int:
        files = self._chunk_files()
        return int(_CHUNK.match(files[-1].name).group(1)) + 1 if files else 0

    def _load(self) -> None:
        chunks = []
        for file in self._chunk_files():
            try:
                with np.load(file) as data:
                    chunks.append({key: data[key] for key in data.files})
            except Exception as err:
                raise ValueError(
                    f"{file} is not a readable trajectory chunk ({type(err).__name__}: {err}). HINT: move the file"
                    " out of the store; the other chunks still open, without the steps it held."
                ) from err
        if not chunks:
            return
        all_steps = np.concatenate([c["step"] for c in chunks])
        keep = _last_occurrences(all_steps)  # a step written twice: the later write wins
        self.steps = all_steps[keep]
        names = sorted({key[5:] for c in chunks for key in c if key.startswith("stat/")})
        self.stats = {
            n: np.concatenate([c.get(f"stat/{n}", np.full(len(c["step"]), np.nan)) for c in chunks])[keep]
            for n in names
        }
        widths = {c["layer_distance"].shape[1] for c in chunks if "layer_distance" in c}
        if widths:
            width = widths.pop()
            self.layer_distance = np.concatenate(
                [c.get("layer_distance", np.full((len(c["step"]), width), np.nan, np.float32)) for c in chunks]
            )[keep]
        sketch_steps = np.concatenate([c["sketch_step"] for c in chunks])
        keep_sketch = _last_occurrences(sketch_steps)
        self.sketch_steps = sketch_steps[keep_sketch]
        self.sketches = np.concatenate([c["sketch"] for c in chunks])[keep_sketch]

    # ------------------------------------------------------------------ writing
    def append(
        self,
        step: int,
        stats: Mapping[str, Any],
        sketch: np.ndarray | None = None,
        layer_distance: np.ndarray | None = None,
    ) -> None:
        """Buffer one optimizer step (written by the next :meth:`flush`). Statistics are numbers, or anything
        ``float()`` accepts (0-d tensors are converted at the flush, not at every step)."""
        self._rows.append((int(step), dict(stats), sketch, layer_distance))

    def flush(self) -> Path | None:
        """Write the buffered steps as one new chunk (atomically). Returns its path. If the write fails (a full
        disk), the steps stay buffered for the next flush and no partial file is left."""
        if not self._rows:
            return None
        rows = list(self._rows)
        steps = np.asarray([r[0] for r in rows], dtype=np.int64)
        names = sorted({k for r in rows for k in r[1]})
        arrays: dict[str, np.ndarray] = {"step": steps}
        for name in names:
            arrays[f"stat/{name}"] = np.asarray([float(r[1].get(name, np.nan)) for r in rows], dtype=np.float64)
        sketched = [r for r in rows if r[2] is not None]
        k = int(self.meta.get("k", 0))
        arrays["sketch_step"] = np.asarray([r[0] for r in sketched], dtype=np.int64)
        arrays["sketch"] = (
            np.stack([np.asarray(r[2], dtype=np.float32) for r in sketched])
            if sketched
            else np.zeros((0, k), np.float32)
        )
        with_layers = [np.asarray(r[3], dtype=np.float32) for r in rows if r[3] is not None]
        if with_layers:
            blank = np.full_like(with_layers[0], np.nan)
            arrays["layer_distance"] = np.stack([blank if r[3] is None else np.asarray(r[3], np.float32) for r in rows])
        path = self.path / "chunks" / f"{self._seq:06d}-{steps[0]:09d}-{steps[-1]:09d}.npz"
        _atomic_write(path, lambda fh: np.savez(fh, **arrays))
        self._seq += 1
        del self._rows[: len(rows)]
        return path

    def copy_to(self, path: str | Path, until_step: int) -> TrajectoryStore:
        """A copy of this store's steps up to ``until_step`` in ``path`` (a folder without a store): a resumed run
        carries its checkpoint's trajectory into its own folder, and the original is only read."""
        shutil.copytree(self.path, path, ignore=shutil.ignore_patterns("*.tmp-*"), dirs_exist_ok=True)
        copy = TrajectoryStore.create(path, self.meta)
        copy.truncate_after(until_step)
        return copy

    def truncate_after(self, step: int) -> None:
        """Drop every stored (and buffered) step after ``step``: the resume point of a checkpoint."""
        self._rows = [r for r in self._rows if r[0] <= step]
        for file in self._chunk_files():
            m = _CHUNK.match(file.name)
            first, last = int(m.group(2)), int(m.group(3))
            if first > step:
                file.unlink()
            elif last > step:
                with np.load(file) as data:
                    arrays = {k: data[k] for k in data.files}
                keep = arrays["step"] <= step
                keep_sk = arrays["sketch_step"] <= step
                for key in list(arrays):
                    if key == "sketch_step" or key == "sketch":
                        arrays[key] = arrays[key][keep_sk]
                    else:
                        arrays[key] = arrays[key][keep]
                new = file.with_name(f"{m.group(1)}-{m.group(2)}-{step:09d}.npz")
                _atomic_write(new, lambda fh, arrays=arrays: np.savez(fh, **arrays))
                if new != file:
                    file.unlink()
        for snap in self.snapshot_steps:
            if snap > step:
                (self.path / "snapshots" / f"step-{snap:09d}.npy").unlink()

    # ------------------------------------------------------------------ snapshots
    def save_snapshot(self, name: str | int, theta: np.ndarray) -> Path:
        """Store a full parameter vector (float32) as ``init`` or ``step-<n>``."""
        label = name if isinstance(name, str) else f"step-{name:09d}"
        path = self.path / "snapshots" / f"{label}.npy"
        _atomic_write(path, lambda fh: np.save(fh, np.asarray(theta, dtype=np.float32)))
        return path

    @property
    def snapshot_steps(self) -> list[int]:
        folder = self.path / "snapshots"
        found = (re.match(r"^step-(\d{9})\.npy$", p.name) for p in folder.iterdir()) if folder.exists() else ()
        return sorted(int(m.group(1)) for m in found if m)

    def snapshot(self, step: int | str) -> np.ndarray:
        """The stored parameter vector at ``step`` (or ``"init"``), memory-mapped."""
        label = step if isinstance(step, str) else f"step-{step:09d}"
        return np.load(self.path / "snapshots" / f"{label}.npy", mmap_mode="r")

    def disk_bytes(self, parts: Iterable[str] = ("chunks", "snapshots")) -> int:
        return sum(f.stat().st_size for part in parts for f in (self.path / part).glob("*") if f.is_file())
