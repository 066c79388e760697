"""Study: ``configs/energy.yaml`` (the quickstart classifier, EnergyLandscape every 4 epochs) run as the config
says, without its W&B logger, and what its triggers found: per trigger the minima, certified minima, basins and
crossing temperature, and at the end the certificates and the chain (:func:`study_digits.certificate_summary`).

Usage: python scripts/study_energy.py [--seed 0] [--out runs/study-energy]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning_landscape  # noqa: F401  (first)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning.pytorch.cli import LightningCLI
from study_digits import certificate_summary

from lightning_landscape import EnergyLandscape

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/study-energy")
    args = parser.parse_args()
    cli = LightningCLI(
        args=[
            "--config",
            str(ROOT / "configs" / "energy.yaml"),
            "--trainer.logger=false",
            f"--trainer.default_root_dir={args.out}",
            f"--seed_everything={args.seed}",
            "--trainer.enable_progress_bar=false",
        ],
        run=False,
        auto_configure_optimizers=False,
    )
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    energy = next(cb for cb in cli.trainer.callbacks if isinstance(cb, EnergyLandscape))
    print(f"fit with the config's callbacks: {time.perf_counter() - start:.1f} s")
    for h in energy.history:
        print(
            f"step {h['step']}: {h['n_minima']} minima, {h.get('minima_certified')} certified,"
            f" {h['n_basins']} basins, crossing temperature {h.get('crossing_temperature', float('nan')):.3g},"
            f" noise level {h['noise_level']:.3g}, {h['spent_seconds']:.1f} s"
        )
    print(certificate_summary(energy.history))
    print(f"chain transition: {energy.chain_transition}")


if __name__ == "__main__":
    main()
