"""Offline analysis of recorded runs: ``lightning-landscape analyze RUN_DIR [RUN_DIR ...]``.

Reads what the callbacks stored under each run directory (searched recursively): trajectory stores of
:class:`~lightning_landscape.TrajectoryRecorder`, the replicas and minima databases of
:class:`~lightning_landscape.EnergyLandscape`. Then, for all runs together (e.g. several seeds):

* a Markov state model of every trajectory that shares one sketch basis (same ``k``, projection seed and
  parameter count): implied timescales, Chapman-Kolmogorov errors, PCCA+ sets, free energy of the states;
* one minima database merging every run's minima (deduplicated in function space, when the runs used the
  same probe set) and their known saddles;
* with ``--config`` (the LightningCLI config of the runs), the joining stage of
  :mod:`~lightning_landscape.energy.basins` on the merged database: straight lines, then minimum-energy paths
  between minima of different basins, of *different* runs too (mode connectivity);
* the basins at ``--merge-barrier`` (default: the largest fixed level the runs used, else each saddle's stored
  noise along it) and their disconnectivity graph.

The same stage functions as :class:`~lightning_landscape.EnergyLandscape` compute all of it, and the same
:class:`~lightning_landscape.energy.EnergyResult` writes it, so its tables have the callback's columns. Everything
goes to ``--out`` (default ``<first RUN_DIR>/landscape-analysis``): figures, ``analysis.npz``, ``metastable.csv``,
``pathways.csv``, ``minima.csv`` (with each minimum's basin, certificate and run), ``basins.csv``, ``barriers.csv``
(both directions, method, convergence), ``summary.json`` and the merged ``minima/`` folder, which is rebuilt on
every call (an earlier analysis in the same folder is replaced, not merged into).

Each stage (Markov model, minima, paths, graph) stands on its own: a stage that fails is named with its error in
``summary.json`` (``errors``) and the others still run; an unreadable store or database is left out and listed
(``skipped``) with the file and the reason. Bad input (a missing RUN_DIR, a ``--config`` of another model) is one
clear line on the command line.

Example::

    lightning-landscape analyze runs/seed-0 runs/seed-1 --config configs/energy.yaml --max-paths 6
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from lightning_landscape.checks import OneLineParser, as_config, check_float, check_int, fail
from lightning_landscape.dynamics import MinimaDatabase, TrajectoryStore
from lightning_landscape.energy.basins import basins_of, join_basins, merge_databases
from lightning_landscape.energy.chain import ChainRun, chain_of_saved_runs
from lightning_landscape.energy.configs import MSMConfig, PathConfig
from lightning_landscape.energy.markov import model_of_stores
from lightning_landscape.energy.result import EnergyResult
from lightning_landscape.report.reporter import Reporter


class AnalysisError(ValueError):
    """Input that ``analyze`` cannot work with; the message names the file or argument and the fix."""


def find_records(run_dirs: list[Path]) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]]]:
    """``(trajectory stores, minima databases)`` under the run directories, each labelled by its run."""
    stores, databases = [], []
    for run in run_dirs:
        if not run.is_dir():
            raise AnalysisError(f"RUN_DIR {str(run)!r} is not a directory. HINT: pass a run's log directory.")
        stores += [
            (run.name, meta.parent) for meta in sorted(run.rglob("meta.json")) if (meta.parent / "chunks").is_dir()
        ]
        databases += [(run.name, index.parent) for index in sorted(run.rglob("minima.json"))]
    return stores, databases


def _imported(name: str | None) -> Any:
    """The function a run recorded by its qualified name (``module.qualname``), or None for none."""
    if name is None:
        return None
    module, _, qualname = name.rpartition(".")
    try:
        if "<" in name:
            raise ImportError("a lambda or a local function cannot be imported")
        return getattr(importlib.import_module(module), qualname)
    except (ImportError, AttributeError, ValueError) as err:
        raise AnalysisError(
            f"the runs measured the energy with `probe.loss_fn={name}`, which cannot be imported ({err}), so the"
            " offline paths would run on another energy than the minima. HINT: define the loss as a module-level"
            " function, importable where `analyze` runs."
        ) from None


def _probe_objective(config: Path, probe: dict[str, Any], n_params: int) -> Any:
    """The runs' model, probe set and energy (``probe``: the databases' probe specification, as
    :attr:`~lightning_landscape.probe.ProbeSpec.metadata` records it, and ``l2``), rebuilt from their LightningCLI
    config (no trainer, no logger): the same samples in the same batches, BatchNorm mode, dtype and loss.

    Raises:
        AnalysisError: when the config builds a model of another size than the minima's ``n_params``, one whose
            loss cannot be evaluated on its data, or when the runs used a ``loss_fn`` that cannot be imported.
    """
    from lightning.pytorch.cli import LightningCLI

    from lightning_landscape.objective import Objective
    from lightning_landscape.probe import probe_chunks

    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it sees both `args` and a command line
    try:
        cli = LightningCLI(
            args=["--config", str(config), "--trainer.logger", "false", "--trainer.callbacks", "[]"],
            run=False,
            save_config_callback=None,
            auto_configure_optimizers=False,
        )
    finally:
        sys.argv = argv
    from lightning_landscape.params import ParameterLayout

    numel = ParameterLayout.from_module(cli.model).numel
    if numel != n_params:
        raise AnalysisError(
            f"--config {str(config)!r} builds a model with {numel} trainable parameters, but the minima have"
            f" {n_params}. HINT: pass the config the runs were trained with."
        )
    source = cli.datamodule if cli.datamodule is not None else cli.model
    if hasattr(source, "setup"):
        source.setup("fit")
    loader = source.train_dataloader()
    if probe.get("probe_batches"):
        raise AnalysisError(
            f"the runs measured the energy on {probe['probe_batches']} batches given as `probe.batches`, which are not"
            " recorded, so `analyze` cannot rebuild their probe set. HINT: let the callback draw the probe set"
            " (`probe.size`, `probe.seed`) in runs to be joined offline."
        )
    batch_size = probe.get("probe_batch_size") or probe["probe_size"]  # databases before it was recorded: one batch
    chunks = probe_chunks(len(loader.dataset), probe["probe_size"], batch_size, probe["probe_seed"])
    batches = [loader.collate_fn([loader.dataset[i] for i in chunk]) for chunk in chunks]
    dtype = getattr(torch, probe.get("dtype") or "float32")
    try:
        objective = Objective(
            cli.model, batches, _imported(probe.get("loss_fn")), bn_mode=probe["bn_mode"], dtype=dtype
        )
        objective.set_l2(probe.get("l2") or 0.0)
        return objective
    except Exception as err:
        raise AnalysisError(
            f"--config {str(config)!r}: the model's loss cannot be evaluated on its data ({type(err).__name__}: {err})."
            " HINT: pass the config the runs were trained with."
        ) from err


def analyze(
    run_dirs: list[str | Path],
    out: str | Path | None = None,
    *,
    msm: MSMConfig | dict | None = None,
    paths: PathConfig | dict | None = None,
    config: str | Path | None = None,
    dedup_tol: float = 0.05,
    merge_barrier: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Rebuild the MSM, paths and disconnectivity graph of one or several runs (see the module docstring), with the
    callback's stage configs: ``msm`` (:class:`~lightning_landscape.energy.MSMConfig`), ``paths``
    (:class:`~lightning_landscape.energy.PathConfig`, default ``max_paths=10``), paths only with the runs'
    LightningCLI ``config``; minima merged at ``dedup_tol``, basins at ``merge_barrier``. Returns the summary that
    is also written to ``summary.json``.

    Raises:
        AnalysisError: a run directory that does not exist or holds no trajectory and no minima, an ``--out`` folder
            with a minima database ``analyze`` did not write, or a ``--config`` of another model.
    """
    runs = [Path(r) for r in run_dirs]
    msm_config = as_config(MSMConfig, msm, "msm")
    paths = as_config(PathConfig, paths if paths is not None else {"max_paths": 10}, "paths")
    stores, databases = find_records(runs)  # checks the run directories before anything is created
    out = Path(out) if out is not None else runs[0] / "landscape-analysis"
    stores = [(run, path) for run, path in stores if not path.resolve().is_relative_to(out.resolve())]
    databases = [(run, path) for run, path in databases if not path.resolve().is_relative_to(out.resolve())]
    if not stores and not databases:
        raise AnalysisError(
            f"No trajectory store and no minima database under {[str(r) for r in runs]}."
            " HINT: pass the log directories of runs recorded with TrajectoryRecorder or EnergyLandscape."
        )
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"runs": [str(r) for r in runs], "out": str(out), "errors": {}, "skipped": []}
    result = EnergyResult(metadata={"runs": summary["runs"], "seed": seed, "msm": vars(msm_config)})

    def stage(name: str, work: Any, *args: Any) -> None:
        try:
            work(*args)
        except AnalysisError:
            raise
        except Exception as err:  # the other stages still run
            summary["errors"][name] = f"{type(err).__name__}: {err}"
            print(f"lightning-landscape analyze: {name} failed ({type(err).__name__}: {err}).", file=sys.stderr)

    markov = lambda: summary.update(model_of_stores(_opened(stores, summary), msm_config, seed, result))  # noqa: E731
    stage("markov state model", markov)
    stage("chain", _chain, runs, out, msm_config, seed, result, summary)
    if databases:
        stage("minima", _minima, databases, out, (dedup_tol, config, paths, merge_barrier), result, summary)
    result.write(Reporter(out, namespace="", progress=False), arrays="analysis")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _opened(stores: list[tuple[str, Path]], summary: dict) -> list[TrajectoryStore]:
    """The trajectory stores that can be read; the others listed as skipped, with the reason."""
    opened = []
    for _, path in stores:
        try:
            opened.append(TrajectoryStore.open(path))
        except (OSError, ValueError) as err:
            summary["skipped"].append({"path": str(path), "reason": str(err)})
    return opened


def _chain(runs: list[Path], out: Path, config: MSMConfig, seed: int, result: EnergyResult, summary: dict) -> None:
    """The chain of every run's saved replicas and training path (:func:`~lightning_landscape.energy.chain.
    chain_of_saved_runs`): ``summary["chain"]``; an unreadable path or replica is listed as skipped."""
    saved = []
    for run in runs:
        for path in sorted(run.rglob("excursions/training-path.npz")):
            if path.resolve().is_relative_to(out.resolve()):
                continue
            try:
                record, key = ChainRun.load(path)
            except (OSError, ValueError, KeyError) as err:  # an unreadable path or outputs file: this run is left out
                summary["skipped"].append({"path": str(path), "reason": f"{type(err).__name__}: {err}"})
                continue
            listed = {entry["path"] for entry in summary["skipped"]}
            summary["skipped"] += [entry for entry in record.replicas.skipped if entry["path"] not in listed]
            saved.append((str(run), record, key))
    info = chain_of_saved_runs(saved, config, seed, result)
    if info:
        summary["chain"] = info


def _minima(databases, out: Path, options: tuple, result: EnergyResult, summary: dict) -> None:
    """The runs' minima merged into ``<out>/minima`` (:func:`~lightning_landscape.energy.basins.merge_databases`),
    joined by straight lines and, with ``--config``, minimum-energy paths between minima of different basins; the
    basins and their disconnectivity graph."""
    dedup_tol, config, paths, merge_barrier = options
    opened = []
    for run, path in databases:
        try:
            opened.append((run, MinimaDatabase(path)))
        except (OSError, ValueError) as err:
            summary["skipped"].append({"path": str(path), "reason": str(err)})
    if not opened:
        return
    folder = out / "minima"
    if folder.exists():  # an earlier analysis into this --out: rebuilt, never merged into
        if not (folder / "minima.json").exists() or not MinimaDatabase(folder).meta.get("merged_by_analyze"):
            raise AnalysisError(f"{folder} exists and was not written by `analyze`. HINT: pass another --out.")
        shutil.rmtree(folder)
    merged, summary["skipped_databases"], own_level = merge_databases(opened, folder, dedup_tol)
    level = merge_barrier if merge_barrier is not None else own_level  # none: each saddle's own
    computed: list = []
    if config is not None and len(merged) > 1:
        try:
            computed = _paths(merged, Path(config), merged.meta, paths, level, summary)
        except AnalysisError:
            raise
        except Exception as err:
            summary["errors"]["paths"] = f"{type(err).__name__}: {err}"
    basins = basins_of(merged, level)
    summary.update(
        minima=len(merged),
        basins=basins.n_basins,
        merge_barrier=level,
        known_saddles=len(merged.saddles),
        paths_computed=len(computed),
    )
    result.add_paths(computed)
    result.add_minima(merged, basins, f"in {len({run for run, _ in opened})} run(s)")


def _paths(merged, config: Path, probe: dict, paths: PathConfig, level: float | None, summary: dict) -> list:
    """Paths between the merged runs' minima. Pairs merge at ``level``; when None, at the noise along them that
    the runs stored with their saddles, and a pair that only ``analyze`` joins (no noise measured) merges only
    below the energy error of its ends: pass ``--merge-barrier`` to merge such pairs at a fixed level."""
    n_params = merged.theta(0).size
    objective = _probe_objective(config, probe, n_params)
    _, plan, computed = join_basins(merged, objective, list(range(len(merged))), level, paths, source="analyze")
    summary["linear_joins"] = len(plan.linear)
    return computed


#: the config fields that the command-line options set, as the error messages name them
OPTION_NAMES = {
    "msm.lag": "--lag",
    "msm.n_clusters": "--clusters",
    "msm.max_metastable": "--max-metastable",
    "paths.images": "--path-images",
    "paths.steps": "--path-steps",
    "paths.step_size": "--path-lr",
    "paths.max_paths": "--max-paths",
    "dedup_tol": "--dedup-tol",
    "merge_barrier": "--merge-barrier",
    "seed": "--seed",
}


def main(args: list[str] | None = None) -> dict[str, Any]:
    """``lightning-landscape analyze``: parse the command line, run :func:`analyze`, print the summary."""
    parser = OneLineParser(prog="lightning-landscape analyze", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", help="log directories of recorded runs (searched recursively)")
    parser.add_argument("--out", default=None, help="output folder (default: <first RUN_DIR>/landscape-analysis)")
    parser.add_argument("--lag", type=int, default=1, help="MSM lag in recorded points")
    parser.add_argument("--clusters", type=int, default=None, help="MSM states (default: one per 20 points)")
    parser.add_argument("--max-metastable", type=int, default=4)
    parser.add_argument("--config", default=None, help="the runs' LightningCLI config: enables path computation")
    parser.add_argument("--max-paths", type=int, default=10)
    parser.add_argument("--path-images", type=int, default=9)
    parser.add_argument("--path-steps", type=int, default=200)
    parser.add_argument("--path-lr", type=float, default=None, help="first FIRE step (default: from the curvature)")
    parser.add_argument("--dedup-tol", type=float, default=0.05)
    parser.add_argument(
        "--merge-barrier", type=float, default=None, help="basins' merge level (default: the runs' own, the largest)"
    )
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args(args)
    try:  # the option values, checked before any work (the same checks as the configs they build)
        msm = MSMConfig(lag=ns.lag, n_clusters=ns.clusters, max_metastable=ns.max_metastable)
        paths = PathConfig(images=ns.path_images, steps=ns.path_steps, step_size=ns.path_lr, max_paths=ns.max_paths)
        check_float("dedup_tol", ns.dedup_tol, hint="e.g. 0.05 (5% output distance).")
        check_float("merge_barrier", ns.merge_barrier, strict=False, optional=True, hint="e.g. 0.01, or leave it out.")
        check_int("seed", ns.seed, minimum=0, example=0)
    except ValueError as err:
        message = str(err)
        for config_name, option in OPTION_NAMES.items():
            message = message.replace(f"`{config_name}", f"`{option}")
        fail(parser.prog, message)
    if ns.config is not None and not Path(ns.config).is_file():
        fail(parser.prog, f"`--config` {ns.config!r} is not a file. HINT: pass the runs' LightningCLI YAML config.")
    try:
        options = {"config": ns.config, "dedup_tol": ns.dedup_tol, "merge_barrier": ns.merge_barrier, "seed": ns.seed}
        summary = analyze(ns.run_dirs, ns.out, msm=msm, paths=paths, **options)
    except AnalysisError as err:  # bad input: one line naming the file or argument and the fix
        fail(parser.prog, str(err))
    print(json.dumps(summary, indent=1))
    return summary
