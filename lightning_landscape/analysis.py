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
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_landscape.checks import OneLineParser, check_float, check_int, fail
from lightning_landscape.dynamics import MinimaDatabase, TrajectoryStore
from lightning_landscape.energy.basins import basins_of, join_basins
from lightning_landscape.energy.chain import ChainRun, chain_of_runs, stages_of, transition_of
from lightning_landscape.energy.configs import MSMConfig, PathConfig
from lightning_landscape.energy.markov import markov_model, transition_between, transition_summary
from lightning_landscape.energy.result import EnergyResult
from lightning_landscape.report.plots import path_atlas_figure
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


def _basis(meta: dict[str, Any]) -> tuple[Any, ...]:
    size = meta.get("n_params") or sum(int(np.prod(s)) for s in meta.get("shapes", []))
    return meta.get("k"), meta.get("projection_seed"), meta.get("nnz"), size


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
    lag: int = 1,
    n_clusters: int | None = None,
    max_metastable: int = 4,
    config: str | Path | None = None,
    max_paths: int = 10,
    path_images: int = 9,
    path_steps: int = 200,
    path_lr: float | None = None,
    dedup_tol: float = 0.05,
    merge_barrier: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Rebuild the MSM, paths and disconnectivity graph of one or several runs (see the module docstring).
    Returns the summary that is also written to ``summary.json``.

    Raises:
        AnalysisError: a run directory that does not exist or holds no trajectory and no minima, an ``--out`` folder
            with a minima database ``analyze`` did not write, or a ``--config`` of another model.
    """
    runs = [Path(r) for r in run_dirs]
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
    result = EnergyResult(metadata={"runs": summary["runs"], "seed": seed, "lag": lag})

    def stage(name: str, work: Any, *args: Any) -> None:
        try:
            work(*args)
        except AnalysisError:
            raise
        except Exception as err:  # the other stages still run
            summary["errors"][name] = f"{type(err).__name__}: {err}"
            print(f"lightning-landscape analyze: {name} failed ({type(err).__name__}: {err}).", file=sys.stderr)

    msm_config = MSMConfig(lag=lag, n_clusters=n_clusters, max_metastable=max_metastable)
    stage("markov state model", _msm_stage, stores, msm_config, seed, result, summary)
    stage("chain", _chain_stage, runs, msm_config, seed, out, result, summary)
    if databases:
        paths = PathConfig(images=path_images, steps=path_steps, step_size=path_lr, max_paths=max_paths)
        options = (dedup_tol, config, paths, merge_barrier)
        stage("minima", _minima_stage, databases, runs, out, result, summary, options)
    result.write(Reporter(out, namespace="", progress=False), arrays="analysis")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _msm_stage(stores, msm_config: MSMConfig, seed, result: EnergyResult, summary: dict) -> None:
    """The MSM of the largest group of trajectories that share a sketch basis."""
    groups: dict[tuple[Any, ...], list[tuple[str, TrajectoryStore]]] = defaultdict(list)
    for run, path in stores:
        try:
            store = TrajectoryStore.open(path)
        except (OSError, ValueError) as err:
            summary["skipped"].append({"path": str(path), "reason": str(err)})
            continue
        if len(store.sketches) > 2 * msm_config.lag:
            groups[_basis(store.meta)].append((run, store))
    if groups:
        group = max(groups.values(), key=lambda g: sum(len(s.sketches) for _, s in g))
        sketches = [s.sketches.astype(np.float64) for _, s in group]
        losses = [
            s.stats.get("loss", np.full(len(s.steps), np.nan))[np.isin(s.steps, s.sketch_steps)] for _, s in group
        ]
        fitted = markov_model(sketches, msm_config, {"loss": losses}, seed)
        summary["trajectories"] = len(group)
        summary["points"] = int(sum(len(s) for s in sketches))
        summary["skipped_trajectories"] = sum(len(g) for g in groups.values()) - len(group)
        if fitted is not None:
            msm, dtrajs, sets = fitted.msm, fitted.dtrajs, fitted.sets
            summary.update(
                slowest_timescale=float(msm.timescales[0]) if len(msm.timescales) else None,
                metastable_states=len(sets) or 1,
                active_states=len(msm.active_set),
                # points in the largest connected set: runs or triggers that never meet in sketch space are apart
                active_points=int(sum(np.isin(d, msm.active_set).sum() for d in dtrajs)),
            )
            summary["connected"] = summary["active_points"] / summary["points"]
            if summary["connected"] < 0.9:
                summary["disconnected"] = (
                    f"only {summary['connected']:.0%} of the points lie in the largest connected set of this MSM (on"
                    " the parameter sketches): trajectories that never meet in parameter space (other seeds, the"
                    " replicas of other triggers) stay apart, so its sets, timescales and transition describe that set"
                    " alone. summary['chain'] (runs with EnergyLandscape) joins them on their probe outputs, where"
                    " permuted copies of one function meet."
                )
            result.add_markov(fitted, 1, "recorded points")
            training = [k for k, (_, s) in enumerate(group) if "excursions" not in Path(s.path).parts]
            if training:  # the longest training path: how it went from its first metastable set to its last
                k = max(training, key=lambda i: len(sketches[i]))
                spacing = float(np.median(np.diff(group[k][1].sketch_steps))) if len(sketches[k]) > 1 else 1.0
                summary["transition"] = _transition(fitted, k, msm_config.lag * spacing, result)


def _transition(fitted, k: int, step: float, result: EnergyResult) -> dict[str, Any]:
    """TPT from the set of trajectory ``k``'s first point to the set of its last (``step``: its steps per lag):
    the summary entry, the arrays, the pathways and the path atlas."""
    found = transition_between(fitted, (k, 0), (k, len(fitted.dtrajs[k]) - 1), step)
    if isinstance(found, str):
        return {"none": found}
    summary = transition_summary(fitted, found)
    result.add_transition(summary, "path_atlas", fitted.plane[1])
    result.arrays.update(forward_committor=found.forward_committor, net_flux=found.net_flux)
    return {key: summary[key] for key in ("source_set", "target_set", "rate_per_step", "mfpt_steps", "pathways")}


def _chain_stage(
    runs: list[Path], config: MSMConfig, seed: int, out: Path, result: EnergyResult, summary: dict
) -> None:
    """One chain of every run's EnergyLandscape replicas and training paths on their outputs on the probe set (the
    callback's chain, :func:`~lightning_landscape.energy.chain.chain_of_runs`, so runs of different seeds meet
    where their weights never do), for the largest group of runs with one probe set and the same output
    coordinates: the fraction of points in its largest connected set, each run's metastable stages of training,
    and the transition of the first run's path (from the first set it enters to its last point's; rate and MFPT in
    replica steps): ``summary["chain"]``, ``chain_path_atlas.png``."""
    groups: dict[tuple[Any, ...], list[tuple[str, ChainRun]]] = defaultdict(list)
    for run in runs:
        for saved in sorted(run.rglob("excursions/training-path.npz")):
            if saved.resolve().is_relative_to(out.resolve()):
                continue
            try:
                record, key = ChainRun.load(saved)
            except (OSError, ValueError, KeyError) as err:  # an unreadable path or outputs file: this run is left out
                summary["skipped"].append({"path": str(saved), "reason": f"{type(err).__name__}: {err}"})
                continue
            listed = {entry["path"] for entry in summary["skipped"]}
            summary["skipped"] += [entry for entry in record.replicas.skipped if entry["path"] not in listed]
            groups[key].append((str(run), record))
    if not groups:
        return
    group = max(groups.values(), key=lambda g: sum(len(r.replicas.features) for _, r in g))
    records = [record for _, record in group]
    chain, first = chain_of_runs(records, config, seed)
    info: dict[str, Any] = {"runs": [run for run, _ in group], "points": chain.points, "connected": chain.connected}
    # the replicas' step rules (lr, momentum): more than one makes the chain one of a mixture of dynamics
    info["step_rules"] = sorted({rule for record in records for rule in record.replicas.rules}, key=str)
    summary["chain"] = info
    if chain.model is None:
        info["transition"] = {"none": str(chain.transition)}
        return
    info["sets"] = len(chain.model.sets) or 1
    info["stages"] = dict(zip(info["runs"], stages_of(chain, records, first), strict=True))
    robustness = chain.robustness
    if robustness is not None:  # what survives other k-means seeds and state counts, and whether sets are metastable
        info["robustness"] = {
            "refits": [list(r) for r in robustness.refits],
            "set_agreement": robustness.agreement,
            "robust_sets": robustness.robust_sets(),
            "transition_agreement": robustness.transition,
            "metastable": robustness.metastable,
            "timescales_lags": robustness.timescales,
        }
    found = transition_of(chain)
    if "none" in found:
        info["transition"] = found
        return
    result.figures["chain_path_atlas"] = path_atlas_figure(found)
    info["transition"] = {k: found[k] for k in ("source_set", "target_set", "rate_per_step", "mfpt_steps", "pathways")}


def _minima_stage(databases, runs, out: Path, result: EnergyResult, summary: dict, options: tuple) -> None:
    """The merged minima database, straight lines and minimum-energy paths between its minima of different basins
    (paths with ``--config``), the basins, and their disconnectivity graph."""
    dedup_tol, config, paths, merge_barrier = options
    opened = []
    for run, path in databases:
        try:
            opened.append((run, MinimaDatabase(path)))
        except (OSError, ValueError) as err:
            summary["skipped"].append({"path": str(path), "reason": str(err)})
    if not opened:
        return
    keys = ("probe_size", "probe_batch_size", "probe_seed", "probe_batches", "n_params", "bn_mode", "dtype", "loss_fn")
    keys += ("l2",)
    probe = {k: opened[0][1].meta.get(k) for k in keys}
    comparable = [(run, db) for run, db in opened if all(db.meta.get(k) == v for k, v in probe.items())]
    summary["skipped_databases"] = len(opened) - len(comparable)  # another model, probe set or weight decay
    folder = out / "minima"
    if folder.exists():  # an earlier analysis into this --out: rebuilt, never merged into
        if not (folder / "minima.json").exists() or not MinimaDatabase(folder).meta.get("merged_by_analyze"):
            raise AnalysisError(f"{folder} exists and was not written by `analyze`. HINT: pass another --out.")
        shutil.rmtree(folder)
    merged = MinimaDatabase(folder, tol=dedup_tol, meta={**opened[0][1].meta, "merged_by_analyze": True})
    for run, db in comparable:
        merged.absorb(db, run=run)
    if merge_barrier is None:  # the runs' own fixed level (the largest, when they differ); none: each saddle's own
        levels = [db.merge_barrier for _, db in comparable if db.merge_barrier is not None]
        merge_barrier = max(levels) if levels else None
    computed: list = []
    if config is not None and len(merged) > 1:
        try:
            computed = _paths(merged, Path(config), probe, paths, merge_barrier, summary)
        except AnalysisError:
            raise
        except Exception as err:
            summary["errors"]["paths"] = f"{type(err).__name__}: {err}"
    basins = basins_of(merged, merge_barrier)
    summary.update(
        minima=len(merged),
        basins=basins.n_basins,
        merge_barrier=merge_barrier,
        known_saddles=len(merged.saddles),
        paths_computed=len(computed),
    )
    result.add_paths(computed)
    result.add_minima(merged, basins, f"in {len(runs)} run(s)")


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
        MSMConfig(lag=ns.lag, n_clusters=ns.clusters, max_metastable=ns.max_metastable)
        PathConfig(images=ns.path_images, steps=ns.path_steps, step_size=ns.path_lr, max_paths=ns.max_paths)
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
        summary = analyze(
            ns.run_dirs,
            ns.out,
            lag=ns.lag,
            n_clusters=ns.clusters,
            max_metastable=ns.max_metastable,
            config=ns.config,
            max_paths=ns.max_paths,
            path_images=ns.path_images,
            path_steps=ns.path_steps,
            path_lr=ns.path_lr,
            dedup_tol=ns.dedup_tol,
            merge_barrier=ns.merge_barrier,
            seed=ns.seed,
        )
    except AnalysisError as err:  # bad input: one line naming the file or argument and the fix
        fail(parser.prog, str(err))
    print(json.dumps(summary, indent=1))
    return summary
