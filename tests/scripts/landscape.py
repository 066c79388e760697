"""LandscapeSampler under DDP: the grid split over ranks and gathered equals the 1-process grid.

Usage: python landscape.py OUT.json DEVICES
"""

import sys
from pathlib import Path

import lightning_landscape  # noqa: F401  (first)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np

from lightning_landscape import LandscapeSampler
from tests.helpers import RunAtTrainStart, finish_script, fit_one_step


class AtStart(RunAtTrainStart, LandscapeSampler):
    pass


if __name__ == "__main__":
    out, devices = sys.argv[1], int(sys.argv[2])
    sampler = AtStart(resolution=7, line_points=9, at_fit_end=False, probe_size=48, probe_batch_size=16)
    trainer = fit_one_step(devices, [sampler], default_root_dir=str(Path(out).parent / f"root-{devices}"))
    result = {}
    if trainer.is_global_zero:
        saved = np.load(sampler.reporter.run_dir / "landscape-step0000000.npz")
        result = {"plane": saved["plane"].tolist(), "profile": saved["profile"].tolist(), "history": sampler.history}
    finish_script(trainer, out, result)
