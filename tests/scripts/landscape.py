"""LandscapeSampler under DDP (or FSDP2 with ``fsdp2``): the grid split over ranks and gathered equals the 1-process
grid.

Usage: python landscape.py OUT.json DEVICES [fsdp2]
"""

import sys
from pathlib import Path

import lightning_landscape  # noqa: F401  (first)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np

from lightning_landscape import LandscapeSampler
from tests.helpers import RunAtTrainStart, finish_script, fit_one_step, fsdp2_strategy, sharded_module_class


class AtStart(RunAtTrainStart, LandscapeSampler):
    pass


if __name__ == "__main__":
    out, devices = sys.argv[1], int(sys.argv[2])
    sampler = AtStart(
        slices={"resolution": 7, "line_points": 9}, at_fit_end=False, probe={"size": 48, "batch_size": 16}
    )
    fsdp2 = {"module_class": sharded_module_class(), "strategy": fsdp2_strategy(devices)} if sys.argv[3:] else {}
    root = Path(out).parent / f"root-{devices}{'-fsdp2' if fsdp2 else ''}"
    trainer = fit_one_step(devices, [sampler], default_root_dir=str(root), **fsdp2)
    result = {}
    if trainer.is_global_zero:
        saved = np.load(sampler.reporter.run_dir / "landscape-step0000000.npz")
        result = {"plane": saved["plane"].tolist(), "profile": saved["profile"].tolist(), "history": sampler.history}
    finish_script(trainer, out, result)
