"""What a trigger of :class:`~lightning_landscape.EnergyLandscape`, or an offline ``analyze``, found: one
:class:`EnergyResult` (scalars, tables, arrays, figures, metadata), built by the same table functions online and
offline and written by one writer, :meth:`EnergyResult.write`, through a
:class:`~lightning_landscape.report.reporter.Reporter`: online to the loggers and the run directory
(``<name>-step<step>.csv``), offline to ``--out`` (``<name>.csv``).

Example::

    >>> import tempfile
    >>> from lightning_landscape.report.reporter import Reporter
    >>> result = EnergyResult(scalars={"n_minima": 2})
    >>> result.table("stages", STAGE_COLUMNS, [[0, 0, 10, 3]])
    >>> [p.name for p in result.write(Reporter(tempfile.mkdtemp(), namespace=""))]
    ['stages.csv', 'energy.npz']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lightning_landscape.dynamics.disconnectivity import disconnectivity_figure, disconnectivity_tree
from lightning_landscape.report.plots import free_energy_figure, path_atlas_figure, paths_figure, timescales_figure

if TYPE_CHECKING:
    from lightning_landscape.dynamics.minima import MinimaDatabase
    from lightning_landscape.energy.basins import BasinsResult
    from lightning_landscape.energy.markov import MarkovModel
    from lightning_landscape.geometry.paths import PathResult
    from lightning_landscape.report.reporter import Reporter

#: one row per stored minimum: its basin, its quench and certificate, where and when it was found (``run``: the
#: run it came from, in a merged database)
MINIMA_COLUMNS = [
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
    "run",
]
BASIN_COLUMNS = ["basin", "loss", "minimum", "members", "visits", "first_step"]
#: both barriers of a saddle (``barrier_ij`` out of minimum ``i``), how its path was found and whether it converged
#: (an unconverged path's saddle is an upper bound)
BARRIER_COLUMNS = [
    "i",
    "j",
    "saddle",
    "barrier_ij",
    "barrier_ji",
    "method",
    "converged",
    "criterion",
    "force_ratio",
    "length",
    "n_grad",
    "step",
]
METASTABLE_COLUMNS = ["set", "population", "mean_loss", "mean_accuracy", "points"]
STAGE_COLUMNS = ["set", "first_step", "last_step", "points"]
PATHWAY_COLUMNS = ["sets", "share"]


#: what a minimum's row shows for a field its record lacks (or stores as null)
MINIMA_DEFAULTS: dict[str, Any] = {
    "grad_norm": np.nan,
    "grad_ratio": np.nan,
    "quench_converged": False,
    "quench_criterion": "",
    "lambda_min": np.nan,
    "energy_error": np.nan,
    "accuracy": np.nan,
    "visits": 1,
    "step": -1,
    "source": "",
    "run": "",
}


def minima_rows(db: MinimaDatabase, labels: np.ndarray) -> list[list[Any]]:
    """The database's minima as rows of :data:`MINIMA_COLUMNS`, with their basin ``labels`` and certificates."""

    def value(record: dict[str, Any], name: str) -> Any:
        found = record.get(name)
        return MINIMA_DEFAULTS[name] if found is None else found

    return [
        [r["id"], int(labels[r["id"]]), r["loss"], value(r, "grad_norm"), value(r, "grad_ratio")]
        + [bool(value(r, "quench_converged")), value(r, "quench_criterion"), certified]
        + [value(r, name) for name in MINIMA_COLUMNS[8:]]
        for r, certified in zip(db.records, db.certified, strict=True)
    ]


def barrier_rows(db: MinimaDatabase) -> list[list[Any]]:
    """The database's saddles as rows of :data:`BARRIER_COLUMNS`."""
    losses = db.losses
    return [
        [
            i,
            j,
            s["saddle"],
            s.get("barrier_ij", s["saddle"] - losses[i]),
            s.get("barrier_ji", s["saddle"] - losses[j]),
            s.get("method", ""),
            bool(s.get("converged", False)),
            s.get("criterion", ""),
            s.get("force_ratio", np.nan),
            s.get("length", np.nan),
            s.get("n_grad", 0),
            s.get("step", -1),
        ]
        for (i, j), s in sorted(db.saddles.items())
    ]


@dataclass
class EnergyResult:
    """Scalars, tables (``name -> (columns, rows)``), arrays (one ``.npz``), figures (``name -> matplotlib
    figure``) and metadata of one analysis. The ``add_*`` methods build the parts both the callback and
    ``analyze`` report, so their columns and names are the same; :meth:`write` writes them all."""

    scalars: dict[str, float] = field(default_factory=dict)
    tables: dict[str, tuple[list[str], list[list[Any]]]] = field(default_factory=dict)
    arrays: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        self.tables[name] = (list(columns), [list(r) for r in rows])

    def add_minima(self, db: MinimaDatabase, basins: BasinsResult, title: str) -> None:
        """The ``minima``, ``basins`` and ``barriers`` tables, their arrays, and the ``disconnectivity`` graph of the
        basins (with one basin: of the minima in it that paths join), titled ``"disconnectivity graph of <what>
        <title>"``."""
        self.table("minima", MINIMA_COLUMNS, minima_rows(db, basins.labels))
        self.table(
            "basins",
            BASIN_COLUMNS,
            [
                [b["basin"], b["loss"], b["minimum"], " ".join(map(str, b["members"])), b["visits"], b["first_step"]]
                for b in basins.rows
            ],
        )
        self.table("barriers", BARRIER_COLUMNS, barrier_rows(db))
        saddles = db.saddle_matrix()
        self.arrays.update(
            minima_losses=db.losses,
            saddles=saddles,
            basin_labels=basins.labels,
            basin_losses=np.asarray([r["loss"] for r in basins.rows]),
            basin_saddles=basins.saddles,
        )
        tree = None
        if basins.n_basins > 1:
            tree = disconnectivity_tree([r["loss"] for r in basins.rows], basins.saddles)
        elif len(joined := np.flatnonzero(np.isfinite(saddles).sum(1) > 1)):  # one basin: its minima
            tree = disconnectivity_tree(db.losses[joined], saddles[np.ix_(joined, joined)], joined)
        if tree is not None:
            what = f"{basins.n_basins} basins" if basins.n_basins > 1 else "the minima of 1 basin"
            self.figures["disconnectivity"] = disconnectivity_figure(tree, f"disconnectivity graph of {what} {title}")
            self.arrays["merge_levels"] = tree.merge_levels

    def add_paths(self, paths: list[tuple[int, int, PathResult]]) -> None:
        """The ``paths`` figure: the energy along each minimum-energy path."""
        if paths:
            self.figures["paths"] = paths_figure([(f"{i} - {j}", p.arc, p.losses) for i, j, p in paths])

    def add_markov(self, model: MarkovModel, every: float, unit: str) -> None:
        """The ``timescales`` and ``free_energy`` figures, the ``metastable`` table and the model's arrays; ``every``
        converts the model's lags into ``unit``."""
        msm = model.msm
        self.figures["timescales"] = timescales_figure(msm.its_lags * every, msm.implied_timescales * every, unit)
        centers, points, explained = model.plane
        self.figures["free_energy"] = free_energy_figure(centers, msm.free_energy, points, explained)
        if msm.metastable_assignment is not None:
            rows = [[row.get(c, np.nan) for c in METASTABLE_COLUMNS] for row in model.sets]
            self.table("metastable", METASTABLE_COLUMNS, rows)
        self.arrays.update(
            transition_matrix=msm.transition_matrix,
            stationary=msm.stationary_distribution,
            free_energy=msm.free_energy,
            its_lags=msm.its_lags,
            implied_timescales=msm.implied_timescales,
            ck_steps=msm.ck_steps,
            ck_error=msm.ck_error,
            active_set=msm.active_set,
        )

    def add_transition(self, summary: dict[str, Any], figure: str = "path_atlas", points: Any = None) -> None:
        """The ``pathways`` table and the path atlas of a transition
        (:func:`~lightning_landscape.energy.markov.transition_summary`)."""
        rows = [[" -> ".join(map(str, p["sets"])), p["share"]] for p in summary["pathways"]]
        self.table("pathways", PATHWAY_COLUMNS, rows)
        self.figures[figure] = path_atlas_figure(summary, points)
        self.arrays["set_flux"] = summary["set_flux"]

    def write(self, reporter: Reporter, step: int | None = None, arrays: str = "energy") -> list[Path]:
        """Everything through ``reporter``: the scalars to its loggers, each table and figure to its files (and
        W&B), the arrays with the metadata to ``<arrays>.npz``; every figure is closed. Returns the files."""
        at = step if step is not None else 0
        reporter.scalars(self.scalars, at)
        written = [reporter.table(name, columns, rows, step) for name, (columns, rows) in self.tables.items()]
        written += [reporter.figure(name, fig, step) for name, fig in self.figures.items()]
        self.figures = {}
        written.append(reporter.arrays(arrays, step, metadata=self.metadata, **self.arrays))
        return [p for p in written if p is not None]
