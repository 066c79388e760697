"""Benchmark: the cost of one EnergyLandscape trigger against the training epoch it follows.

On the quickstart model (Gaussian-mixture classifier, MLP 2-32-32-4, 2048 samples, batch 64 = 32 steps per
epoch) trained as ``configs/energy.yaml`` trains it (weight decay 5e-4, the energy on all 2048 samples), in one run:
  * the epoch time without any callback (median over epochs);
  * one trigger at the default settings, and how it scales with the number of replicas (4, 8, 16): seconds per
    stage, batch passes spent, and the ratio trigger / epoch (the trigger after the first, warm);
  * per trigger: basins and minima found, the merge level (the replicas' noise level), whether training's basin
    stays the same, and the converged fractions of quenches and paths;
  * the same trigger without weight decay (on data the network can fit, cross-entropy then has no minimum at
    finite weights: the quenches cannot converge, and the callback says so);
  * 1 against 2 processes (DDP, gloo, one thread each) for the same trigger: replicas, quenches and paths
    are split over the ranks.

Usage: python scripts/bench_energy.py [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning_landscape  # noqa: F401  (first)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl

from lightning_landscape import EnergyLandscape
from scripts.common import fit_quickstart


class EpochTimer(pl.Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # runs before the energy callback's epoch hook
        self.seconds.append(time.perf_counter() - self._start)


WEIGHT_DECAY, PROBE_SIZE = 5e-4, 2048  # as configs/energy.yaml


def trigger(replicas: int, epochs: int, root: str, devices: int = 1, weight_decay: float = WEIGHT_DECAY) -> dict:
    """The last trigger's record (every epoch, warm after the first) and the median epoch time."""
    timer = EpochTimer()
    energy = EnergyLandscape(
        every_n_epochs=1, at_fit_end=False, progress=False, sampling={"replicas": replicas}, probe_size=PROBE_SIZE
    )
    trainer = fit_quickstart([timer, energy], epochs, root, devices, weight_decay)
    keys = ("n_minima", "n_basins", "current_basin", "merge_barrier", "quenches_run", "quenches_converged")
    keys += ("linear_joins", "paths_run", "paths_converged", "quench_grads", "path_grads")
    triggers = [{k: h.get(k) for k in ("step", *keys)} for h in energy.history]
    return {
        **energy.history[-1],
        "epoch": statistics.median(timer.seconds),
        "rank0": trainer.is_global_zero,
        "triggers": triggers,
    }


def worker(out: str, devices: int, epochs: int) -> None:
    result = trigger(8, epochs, str(Path(out).parent / f"ddp-{devices}"), devices)
    if result["rank0"]:
        Path(out).write_text(json.dumps(result))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.epochs)
        return
    root = tempfile.mkdtemp(prefix="bench-energy-")
    timer = EpochTimer()
    fit_quickstart([timer], args.epochs, root, weight_decay=WEIGHT_DECAY)
    epoch = statistics.median(timer.seconds)
    print(f"quickstart epoch without callbacks: {epoch:.3f} s (32 steps)")
    stages = ["basin_sampling", "minima", "paths", "basins", "markov_state_model"]
    print(f"{'replicas':>8} {'trigger s':>9} {'x epoch':>8} {'passes':>8} " + " ".join(f"{s:>18}" for s in stages))
    for replicas, weight_decay in ((4, WEIGHT_DECAY), (8, WEIGHT_DECAY), (16, WEIGHT_DECAY), (8, 0.0)):
        r = trigger(replicas, args.epochs, root, weight_decay=weight_decay)
        cells = " ".join(f"{r.get(f'seconds_{s}', float('nan')):>18.3f}" for s in stages)
        seconds = r["spent_seconds"]
        label = f"{replicas}" + ("" if weight_decay else " (no weight decay)")
        print(f"{label:>8} {seconds:>9.2f} {seconds / epoch:>8.1f} {r['spent_passes']:>8} {cells}")
        for t in r["triggers"]:
            print(
                f"{'':>8} step {t['step']}: {t['n_basins']} basins of {t['n_minima']} minima (merge_barrier"
                f" {t['merge_barrier']:.4f}, training in basin {t['current_basin']}); quenches converged"
                f" {t['quenches_converged']}/{t['quenches_run']} ({t['quench_grads']} gradients);"
                f" joins: {t['linear_joins']} straight lines, paths converged {t['paths_converged']}/{t['paths_run']}"
                f" ({t['path_grads']} gradients)"
            )
    print("\n1 vs 2 processes (DDP gloo, 1 thread per process, 8 replicas, global batch 64):")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
    for devices in (1, 2):
        out = Path(root) / f"ddp-{devices}.json"
        cmd = [sys.executable, __file__, "--epochs", str(args.epochs), "--worker", str(out), str(devices)]
        subprocess.run(cmd, check=True, env=env, capture_output=True, text=True, cwd=root)
        r = json.loads(out.read_text())
        cells = " ".join(f"{s}={r.get(f'seconds_{s}', float('nan')):.2f}s" for s in stages)
        print(f"  {devices} process(es): trigger {r['spent_seconds']:.2f} s, epoch {r['epoch']:.3f} s, {cells}")


if __name__ == "__main__":
    main()
