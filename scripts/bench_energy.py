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
    are split over the ranks;
  * basin sampling alone, 16 SGD replicas of 200 steps from the trained point on the trigger's pool of 8 batches:
    the previous implementation (one replica per call), the replicas stepped one at a time (``batching="loop"``)
    and all together in one vmapped call (``"auto"``, which picks vmap here), side by side, in replica-steps per
    second; whether the loops agree to the bit, whether a batched replica is bit-identical to itself run alone on
    the batched path, and how far batched and loop differ (rounding); and the floor of any vmapped step here, the
    bare network's;
  * the training path's recording between triggers (probe outputs every 5 steps): the epoch against one without.

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
import numpy as np

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
        every_n_epochs=1, at_fit_end=False, progress=False, sampling={"replicas": replicas}, probe={"size": PROBE_SIZE}
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


def previous_sample_basin(objective, theta, replica: int, steps: int, lr: float, seed: int, sketch, record_every: int):
    """The implementation before replicas were batched (what EnergyLandscape ran, one replica per call): every step
    one ``loss_and_grad``, which sets and undoes the objective's evaluation mode each time. SGD, no probe outputs."""
    import torch

    from lightning_landscape.dynamics.excursions import replica_seed

    generator = torch.Generator().manual_seed(replica_seed(seed, replica))
    x, rows = theta.clone(), []
    for s in range(steps + 1):
        batch = int(torch.randint(len(objective.batches), (1,), generator=generator))
        record = s % record_every == 0 or s == steps
        loss, g = objective.loss_and_grad(x, batch=batch) if s < steps else (objective.loss(x, batch=batch), None)
        if record:
            rows.append((sketch(x).double().cpu().numpy(), float(loss)))
        if s < steps:
            x = x - lr * g
    return x, rows


def vmapped_floor(model, pool, x0, replicas: int, steps: int) -> float:
    """The least a vmapped SGD step of these replicas can cost: the bare network (no ``training_step``, no
    Objective), its cross-entropy of each replica on its own batch, nothing recorded; the seconds of ``steps`` steps,
    the faster of ``vmap(grad)`` and a vmapped forward with one ordinary backward (what the Objective runs)."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad, vmap

    from lightning_landscape import ParameterLayout

    network, layout = model.network, ParameterLayout.from_module(model.network)
    inputs, labels = torch.stack([b[0] for b in pool]), torch.stack([b[1] for b in pool])
    index = torch.arange(replicas) % len(pool)

    def loss(theta, x, y):
        return (
            F.cross_entropy(functional_call(network, layout.unflatten(theta), (x,)), y)
            + 0.5 * WEIGHT_DECAY * (theta * theta).sum()
        )

    def backward_outside(x, inputs, labels):
        x = x.detach().requires_grad_(True)
        return torch.autograd.grad(vmap(loss)(x, inputs, labels).sum(), x)[0]

    seconds = []
    for step in (vmap(grad(loss)), backward_outside):
        x = x0.expand(replicas, -1).clone()
        start = time.perf_counter()
        for _ in range(steps):
            x = x - 0.1 * step(x, inputs[index], labels[index])
        seconds.append(time.perf_counter() - start)
    return min(seconds)


def replica_speed(root: str, replicas: int = 16, steps: int = 200, repeats: int = 5) -> None:
    """Basin sampling alone: the previous per-replica loop, today's loop and the batched replicas, ``repeats``
    rounds of each, interleaved so that drift hits all alike; the best time of each, and the speed-ups as the
    median over rounds of each round's ratio (steadier than the ratio of the bests on a shared machine)."""
    import torch

    from lightning_landscape import Objective
    from lightning_landscape.dynamics import SparseProjection, sample_basin

    trainer = fit_quickstart([], 3, root, weight_decay=WEIGHT_DECAY)
    model, data = trainer.lightning_module, trainer.datamodule
    generator = torch.Generator().manual_seed(0)
    index = torch.randperm(len(data.train_set), generator=generator)[: 8 * 64].reshape(8, 64)
    pool = [data.train_dataloader().collate_fn([data.train_set[int(i)] for i in chunk]) for chunk in index]
    x0 = Objective(model, pool).theta0
    sketch = SparseProjection(x0.numel(), 256, seed=0)
    seconds, runs, previous = {k: [] for k in ("previous", "loop", "auto", "floor")}, {}, []
    for _ in range(repeats):
        objective = Objective(model, pool, l2=WEIGHT_DECAY)
        start = time.perf_counter()
        previous = [previous_sample_basin(objective, x0, r, steps, 0.1, 0, sketch, 5) for r in range(replicas)]
        seconds["previous"].append(time.perf_counter() - start)
        for batching in ("loop", "auto"):
            objective = Objective(model, pool, batching=batching, l2=WEIGHT_DECAY)
            start = time.perf_counter()
            runs[batching] = sample_basin(objective, x0, replicas, steps, 0.1, seed=0, sketch=sketch, record_every=5)
            seconds[batching].append(time.perf_counter() - start)
        seconds["floor"].append(vmapped_floor(model, pool, x0, replicas, steps))
    looped = all(torch.equal(runs["loop"].finals[r], previous[r][0]) for r in range(replicas)) and all(
        (runs["loop"].sketches[r] == np.stack([p for p, _ in previous[r][1]])).all() for r in range(replicas)
    )
    alone = Objective(model, pool, batching="vmap", l2=WEIGHT_DECAY)  # a replica alone, on the batched path
    batched = all(
        torch.equal(sample_basin(alone, x0, [r], steps, 0.1, seed=0, sketch=sketch, record_every=5).finals[0], end)
        for r, end in enumerate(runs["auto"].finals)
    )
    deviation = float((runs["auto"].finals - runs["loop"].finals).abs().max())
    best = {k: min(v) for k, v in seconds.items()}
    rate = {k: replicas * steps / v for k, v in best.items()}
    ratios = {k: [p / t for p, t in zip(seconds["previous"], v, strict=True)] for k, v in seconds.items()}
    print(f"\nbasin sampling, {replicas} replicas x {steps} steps (replica-steps per second):")
    labels = {
        "previous": "previous loop, one replica per call",
        "loop": "loop",
        "auto": "batched",
        "floor": "floor: bare network, vmapped step only",
    }
    for key, label in labels.items():
        spread = f"{min(ratios[key]):.1f}-{max(ratios[key]):.1f}"
        speedup = f"{statistics.median(ratios[key]):.1f}x the previous (rounds: {spread})"
        print(f"  {label:>36}: best {best[key]:.2f} s, {rate[key]:.0f}/s, {speedup}")
    print(f"  every replica bit-identical in the previous loop and the loop: {looped}")
    print(f"  every batched replica bit-identical to itself run alone on the batched path: {batched}")
    print(f"  batched against the loop: largest difference of the final weights {deviation:.1e}")


def path_overhead(root: str, epochs: int) -> None:
    """What recording the training path costs between triggers: the median epoch with EnergyLandscape (no trigger
    in the run) recording the path every 5 steps (the default) against not recording it and against no callback,
    for the default probe set (256) and energy.yaml's (2048), each configuration twice, interleaved."""
    print("\ntraining path (probe outputs every sampling.record_every=5 steps), median epoch of 32 steps:")
    runs: dict[str, list[float]] = {}
    for _ in range(2):
        for label, probe, path in (
            ("no callback", 0, False),
            *[(f"probe {n}, path {p}", n, p) for n in (256, 2048) for p in (False, True)],
        ):
            timer = EpochTimer()
            callbacks: list = [timer]
            if probe:
                callbacks.append(
                    EnergyLandscape(
                        every_n_epochs=10**6,
                        at_fit_end=False,
                        progress=False,
                        sampling={"training_path": path},
                        probe={"size": probe},
                    )
                )
            fit_quickstart(callbacks, epochs, root, weight_decay=WEIGHT_DECAY)
            runs.setdefault(label, []).append(statistics.median(timer.seconds))
    base = statistics.median(runs["no callback"])
    for label, seconds in runs.items():
        value = statistics.median(seconds)
        print(f"  {label:>22}: {value:.3f} s ({value / base:.2f}x the plain epoch)")


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
    parser.add_argument("--replicas-only", action="store_true", help="only the basin-sampling comparison")
    parser.add_argument("--path-only", action="store_true", help="only the training path's cost")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.epochs)
        return
    root = tempfile.mkdtemp(prefix="bench-energy-")
    if args.replicas_only:
        replica_speed(root)
        return
    if args.path_only:
        path_overhead(root, args.epochs)
        return
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
    replica_speed(root)
    path_overhead(root, args.epochs)
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
