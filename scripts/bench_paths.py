"""Benchmark: do minimum-energy paths and quenches converge with their defaults on a real network, and at what cost?

On the quickstart model (Gaussian-mixture classifier, MLP 2-32-32-4) trained for a few epochs, an EnergyLandscape
trigger at its defaults gives quenched minima; between pairs of them, in the same run:
  * the default path (FIRE, first step from the curvature at the ends): converged or not, its force ratio (largest
    perpendicular force over the gradient scale; converged at <= 1e-3), and the gradient evaluations it took;
  * the previous default, the fixed-step string method (gradient descent at the training learning rate, 0.1, then
    redistribution), run until the same force ratio or a cap: the gradient evaluations it needs for equal accuracy;
  * the quenches of that trigger: the fraction whose gradient norm fell below 1e-3 of the gradient scale at their
    start point (L-BFGS, `quench_iter` iterations).

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
from lightning_landscape.dynamics import MinimaDatabase, quench
from lightning_landscape.geometry.paths import _grads, _losses, _redistribute, _tangents, minimum_energy_path
from scripts.common import fit_quickstart


def fixed_step_string(objective, a, b, n_images: int, lr: float, tol: float, cap: int) -> tuple[bool, int, float]:
    """The previous default: images step ``-lr grad`` and are redistributed; until the force ratio is ``<= tol``."""
    images = a + torch.linspace(0, 1, n_images, dtype=a.dtype).unsqueeze(1) * (b - a)
    scale = float(_grads(objective, images).norm(dim=1).max())
    n_grad, ratio = n_images, float("inf")
    while n_grad < cap:
        grads = _grads(objective, images[1:-1])
        n_grad += n_images - 2
        tau = _tangents(images, _losses(objective, images))[1:-1]
        ratio = float((grads - (grads * tau).sum(1, keepdim=True) * tau).norm(dim=1).max()) / scale
        if ratio <= tol or not torch.isfinite(grads).all():
            break
        moved = images.clone()
        moved[1:-1] = images[1:-1] - lr * grads
        images = _redistribute(moved)
    return ratio <= tol, n_grad, ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--cap", type=int, default=20000, help="gradient evaluations for the fixed-step method")
    args = parser.parse_args()
    energy = EnergyLandscape(
        every_n_epochs=args.epochs, at_fit_end=False, progress=False, quench={"dedup_tol": 0.01}, paths={"max_paths": 0}
    )
    trainer = fit_quickstart([energy], args.epochs, tempfile.mkdtemp(prefix="bench-paths-"))
    model = trainer.lightning_module
    objective = energy.objective(trainer, model)
    db = MinimaDatabase(energy.minima_dir)
    print(f"{len(db)} quenched minima after {args.epochs} epochs; paths between the first {args.pairs} pairs")
    pairs = [(i, j) for i in range(len(db)) for j in range(i + 1, len(db))][: args.pairs]
    rows = []
    for i, j in pairs:
        a, b = (torch.from_numpy(db.theta(k)).to(objective.theta0) for k in (i, j))
        path = minimum_energy_path(objective, a, b, n_images=9)
        old = fixed_step_string(objective, a, b, 9, lr=0.1, tol=1e-3, cap=args.cap)
        rows.append((path.converged, path.n_grad, path.force_ratio, *old))
        print(
            f"  {i}-{j}: FIRE converged={path.converged} ratio={path.force_ratio:.1e} grads={path.n_grad:6d} |"
            f" fixed step converged={old[0]} ratio={old[2]:.1e} grads={old[1]:6d}"
        )
    fire_ok = [r for r in rows if r[0]]
    print(
        f"FIRE (defaults): {len(fire_ok)}/{len(rows)} converged, median {statistics.median(r[1] for r in rows)} grads"
    )
    print(
        f"fixed step (lr 0.1) to the same accuracy: {sum(r[3] for r in rows)}/{len(rows)} within {args.cap} grads,"
        f" median {statistics.median(r[4] for r in rows)} grads"
    )
    # quenches from the replicas' ends: converged when |grad| <= 1e-3 of the gradient scale at their start
    converged = 0
    for record in db.records:
        start = torch.from_numpy(db.theta(record["id"])).to(objective.theta0)
        start = start + 0.05 * torch.randn_like(start)
        q = quench(objective, start, max_iter=energy.quench.max_iter)
        converged += q.converged  # |grad| <= 1e-3 |grad at the start|
    print(f"quenches (L-BFGS, {energy.quench.max_iter} iterations): {converged}/{len(db)} converged")


if __name__ == "__main__":
    main()
