"""Study: the energy landscape of training on real data (scikit-learn's bundled handwritten digits), 4 seeds.

Each seed trains the digits classifier of ``configs/digits.yaml`` (MLP 64-64-10, SGD with momentum and weight decay,
10 epochs) with TrajectoryRecorder and EnergyLandscape (a trigger every 2 epochs, 8 replicas); then
``lightning-landscape analyze`` takes the 4 runs together (with the config, so paths join the seeds' minima).
Prints, per seed: the wall time against a plain fit, the validation accuracy, the chain of all triggers at the end
(points, connected fraction, metastable sets, the training path's metastable stages, the transition to the final
set from the first one training enters: MFPT in replica steps and the dominant pathway), basins and the slowest
timescale; and for the 4 runs together:
the MSM's metastable sets and the training path's transition, basins, minima, and the barriers between the seeds'
basins. Copies the analysis' path atlas (or, where the runs together show no transition, seed 0's at its last
trigger) to ``docs/digits-path-atlas.png``.

Usage: python scripts/study_digits.py [--seeds 4] [--out runs/study-digits]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from pathlib import Path

import lightning_landscape  # noqa: F401  (first)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

from lightning_landscape import EnergyLandscape, TrajectoryRecorder
from lightning_landscape.analysis import analyze
from lightning_landscape.examples import MLP, Classifier, DigitsDataModule

ROOT = Path(__file__).resolve().parents[1]


def fit(seed: int, root: Path, callbacks: list) -> tuple[pl.Trainer, float]:
    """The digits config's model and data, trained for 10 epochs; ``(trainer, seconds)``."""
    pl.seed_everything(seed)
    model = Classifier(MLP(64, 10, [64]), lr=0.1, momentum=0.9, weight_decay=5e-4)
    trainer = pl.Trainer(
        max_epochs=10,
        accelerator="cpu",
        logger=CSVLogger(root) if callbacks else False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=10,
        default_root_dir=root,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=DigitsDataModule(n_val=297, batch_size=64))
    return trainer, time.perf_counter() - start


def certificate_summary(history: list[dict]) -> str:
    """One line on an EnergyLandscape run's certificates, basins and chain (its ``history``, all triggers)."""
    last, quenched = history[-1], max(sum(h["quenches_run"] for h in history), 1)
    return (
        f"certificates: {last.get('minima_certified')} of {last['n_minima']} stored minima certified,"
        f" {sum(h.get('saddles_kicked', 0) for h in history)} saddles kicked,"
        f" {sum(h.get('certificate_hvps', 0) for h in history) / quenched:.0f} Hessian-vector products and"
        f" {sum(h['quench_grads'] for h in history) / quenched:.0f} gradients per quenched point,"
        f" {sum(h.get('minima_refined', 0) for h in history)} minima refined; {last['n_basins']} basins at the"
        f" noise along each barrier (median crossing temperature {last.get('crossing_temperature', float('nan')):.3g},"
        f" noise level {last['noise_level']:.3g}); chain: {last.get('chain_sets_robust', '-')} of"
        f" {last.get('chain_sets', '-')} sets robust, metastable {bool(last.get('chain_metastable', 0))}, the"
        f" transition's sets apart in {100 * last.get('chain_transition_agreement', float('nan')):.0f}% of refits"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--out", default="runs/study-digits")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    _, plain = fit(0, out / "plain", [])
    print(f"plain fit (no callbacks, 10 epochs): {plain:.1f} s")
    print(
        f"{'seed':>4} {'wall s':>7} {'x plain':>7} {'val acc':>7} {'chain pts':>9} {'conn':>5} {'sets':>4}"
        f" {'MFPT (replica steps)':>20} {'basins':>6} {'slowest (steps)':>15}  dominant pathway"
    )
    for seed in range(args.seeds):
        energy = EnergyLandscape(
            every_n_epochs=2,
            sampling={"replicas": 8, "steps": 200, "record_every": 5},
            budget={"share": None, "seconds": 60},
            progress=False,
            probe={"size": 1500},
        )
        recorder = TrajectoryRecorder(sketch_every_n_steps=1, snapshot_every_n_steps=25)  # on the path's record grid
        trainer, seconds = fit(seed, out / f"seed-{seed}", [recorder, energy])
        last = energy.history[-1]
        accuracy = float(
            trainer.validate(trainer.lightning_module, datamodule=trainer.datamodule, verbose=False)[0]["val/acc"]
        )
        found = energy.chain_transition
        pathway = found.get("none", "-")
        if found.get("pathways"):
            top = found["pathways"][0]
            sets = " -> ".join(map(str, top["sets"]))
            pathway = f"steps {found['source_step']} to {found['target_step']}: {sets} ({100 * top['share']:.0f}%)"
        stages = " ".join(f"{s['set']}@{s['first_step']}" for s in energy.chain_stages)  # set@first step
        mfpt = last.get("chain_mfpt")
        mfpt = "-" if mfpt is None else f"{mfpt:.0f}"
        slowest = last.get("slowest_timescale")
        slowest = "-" if slowest is None else f"{slowest:.0f}"
        print(
            f"{seed:>4} {seconds:>7.1f} {seconds / plain:>7.1f} {accuracy:>7.3f} {last.get('chain_points', 0):>9}"
            f" {last.get('chain_connected', float('nan')):>5.2f} {last.get('chain_sets', 1):>4} {mfpt:>20}"
            f" {last['n_basins']:>6} {slowest:>15}  {pathway}"
        )
        print(f"     training stages (metastable set @ first step, -1: outside the connected set): {stages}")
        print("     " + certificate_summary(energy.history))
    start = time.perf_counter()
    summary = analyze(
        [out / f"seed-{s}" for s in range(args.seeds)], out / "analysis", config=ROOT / "configs" / "digits.yaml"
    )
    print(f"\nanalyze of the {args.seeds} runs together: {time.perf_counter() - start:.1f} s")
    keys = ("trajectories", "points", "active_points", "metastable_states", "slowest_timescale", "minima", "basins")
    keys += ("merge_barrier", "known_saddles", "paths_computed", "linear_joins", "transition", "chain", "errors")
    print(json.dumps({k: summary.get(k) for k in keys}, indent=1, default=str))
    rows = (
        list(csv.reader((out / "analysis" / "barriers.csv").open()))
        if (out / "analysis" / "barriers.csv").exists()
        else []
    )
    if rows:
        print("barriers between minima (i, j, saddle, barrier_ij, barrier_ji, method, converged):")
        for row in rows[1:11]:
            print("  " + ", ".join(row[:7]))
    # analyze's atlas of the runs together when its chain has a transition, else seed 0's at its last trigger
    atlas = out / "analysis" / "chain_path_atlas.png"
    if not atlas.exists():
        atlas = max((out / "seed-0").rglob("path_atlas-step*.png"), default=atlas)
    if atlas.exists():
        shutil.copy(atlas, ROOT / "docs" / "digits-path-atlas.png")
        print(f"path atlas ({atlas.relative_to(out)}): {ROOT / 'docs' / 'digits-path-atlas.png'}")


if __name__ == "__main__":
    main()
