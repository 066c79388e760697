"""Benchmark: do minimum-energy paths and quenches converge with their defaults on a real network, and at what cost?

On the quickstart model (Gaussian-mixture classifier, MLP 2-32-32-4) trained for a few epochs as
``configs/energy.yaml`` trains it (weight decay 5e-4, the energy on all 2048 samples), an EnergyLandscape trigger at
its defaults gives quenched minima; between pairs of them, in the same run:
  * the default path (FIRE, first step from the curvature at the ends, converged when its perpendicular force is
    below 1e-3 of the gradient scale or when 20 iterations change no image's loss by more than the energy
    resolution, a tenth of the merge level): converged or not, on which criterion, its saddle, force ratio and the
    gradient evaluations it took;
  * the previous default, the fixed-step string method (gradient descent at the training learning rate, 0.1, then
    redistribution), run until its saddle is within the energy resolution of the FIRE path's (equal accuracy) or
    a cap: the gradient evaluations it needs;
  * the quenches of that trigger: how many converged, on which criterion, and their gradient evaluations.

Usage: python scripts/bench_paths.py [--epochs 4] [--pairs 8] [--cap 20000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import lightning_landscape  # noqa: F401  (first)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from lightning_landscape import EnergyLandscape
from lightning_landscape.dynamics import MinimaDatabase
from lightning_landscape.geometry.paths import _grads, _losses, _redistribute, minimum_energy_path
from scripts.common import fit_quickstart


def fixed_step_string(objective, a, b, n_images: int, lr: float, target: float, ftol: float, cap: int):
    """The previous default: images step ``-lr grad`` and are redistributed, until the highest inner image is within
    ``ftol`` of ``target`` (or ``cap`` gradients): ``(reached, gradient evaluations, saddle loss)``."""
    images = a + torch.linspace(0, 1, n_images, dtype=a.dtype).unsqueeze(1) * (b - a)
    n_grad = 0
    while True:
        top = float(_losses(objective, images)[1:-1].max())
        if abs(top - target) <= ftol or n_grad >= cap:
            return abs(top - target) <= ftol, n_grad, top
        grads = _grads(objective, images[1:-1])
        n_grad += n_images - 2
        if not torch.isfinite(grads).all():
            return False, n_grad, float("nan")
        moved = images.clone()
        moved[1:-1] = images[1:-1] - lr * grads
        images = _redistribute(moved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--cap", type=int, default=20000, help="gradient evaluations for the fixed-step method")
    args = parser.parse_args()
    energy = EnergyLandscape(
        every_n_epochs=args.epochs, at_fit_end=False, progress=False, paths={"max_paths": 0}, probe={"size": 2048}
    )
    trainer = fit_quickstart([energy], args.epochs, tempfile.mkdtemp(prefix="bench-paths-"), weight_decay=5e-4)
    run = energy.history[-1]
    print(
        f"quenches of the trigger: {run['quenches_converged']}/{run['quenches_run']} converged"
        f" ({run['quenches_stationary']} on the gradient, the others on the energy), {run['quench_grads']} gradients"
    )
    objective = energy.objective(trainer, trainer.lightning_module)
    objective.set_l2(5e-4)
    db = MinimaDatabase(energy.minima_dir)
    ftol = run["merge_barrier"] / 10
    print(
        f"{len(db)} quenched minima after {args.epochs} epochs; energy resolution {ftol:.2e}; first {args.pairs} pairs"
    )
    pairs = [(i, j) for i in range(len(db)) for j in range(i + 1, len(db))][: args.pairs]
    rows = []
    for i, j in pairs:
        a, b = (torch.from_numpy(db.theta(k)).to(objective.theta0) for k in (i, j))
        path = minimum_energy_path(objective, a, b, n_images=9, n_steps=100, ftol=ftol)
        old = fixed_step_string(objective, a, b, 9, 0.1, path.saddle_loss, ftol, args.cap)
        rows.append((path.converged, path.n_grad, *old))
        print(
            f"  {i}-{j}: FIRE converged={path.converged} ({path.criterion or '-'}) saddle={path.saddle_loss:.5f}"
            f" force ratio={path.force_ratio:.1e} grads={path.n_grad:6d} | fixed step to the same saddle:"
            f" reached={old[0]} grads={old[1]:6d} (saddle {old[2]:.5f})"
        )
    print(
        f"FIRE (defaults): {sum(r[0] for r in rows)}/{len(rows)} converged,"
        f" median {statistics.median(r[1] for r in rows)} grads"
    )
    print(
        f"fixed step (lr 0.1) to the same saddle: {sum(r[2] for r in rows)}/{len(rows)} within {args.cap} grads,"
        f" median {statistics.median(r[3] for r in rows)} grads"
    )


if __name__ == "__main__":
    main()
