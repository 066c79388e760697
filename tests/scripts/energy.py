"""EnergyLandscape under DDP: replicas and path images split over ranks give the 1-process result. With ``chain``, a
second trigger after the first step, whose restarted replica starts from a first trigger's end or from the
TrajectoryRecorder's snapshot of the initial weights (the chain).

Both runs have the same global batch size (32 = 1 x 32 = 2 x 16), so the replicas' minibatches are the same.
Usage: python energy.py OUT.json DEVICES [chain]
"""

import sys
from pathlib import Path

import lightning_landscape  # noqa: F401  (first)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np

from lightning_landscape import EnergyLandscape, TrajectoryRecorder, TrajectoryStore
from lightning_landscape.dynamics import MinimaDatabase
from tests.helpers import RunAtTrainStart, finish_script, fit_one_step


class AtStart(RunAtTrainStart, EnergyLandscape):
    pass


if __name__ == "__main__":
    out, devices = sys.argv[1], int(sys.argv[2])
    chain = sys.argv[3:] == ["chain"]
    energy = AtStart(
        every_n_steps=1 if chain else None,
        at_fit_end=False,
        probe={"size": 48},
        sampling={"replicas": 4, "steps": 10, "record_every": 2},
        paths={"steps": 10, "max_paths": 2},
    )
    root = str(Path(out).parent / f"root-{devices}")
    callbacks = [TrajectoryRecorder(sketch_dim=16, snapshot_every_n_steps=1), energy] if chain else [energy]
    trainer = fit_one_step(devices, callbacks, batch_size=32 // devices, default_root_dir=root)
    result = {}
    if trainer.is_global_zero:
        run_dir = energy.reporter.run_dir
        stores = sorted((run_dir / "excursions").glob("step-*/replica-*" if chain else "step-000000000/replica-*"))
        db = MinimaDatabase(run_dir / "minima")
        saddles = db.saddle_matrix()
        result = {
            "sketches": [TrajectoryStore.open(s).sketches.tolist() for s in stores],
            "minima": db.losses.tolist(),
            "saddles": np.where(np.isfinite(saddles), saddles, -1.0).tolist(),
            "history": energy.history[0],
            "chain": {k: v for k, v in energy.history[-1].items() if k.startswith("chain")},
            "restarted_from": energy.history[-1].get("restarted_from"),
        }
    finish_script(trainer, out, result)
