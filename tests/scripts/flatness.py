"""FlatnessMonitor under DDP: probe set sharded, Hessian-vector products summed over ranks.

Usage: python flatness.py OUT.json DEVICES
"""

import sys
from pathlib import Path

import lightning_landscape  # noqa: F401  (first)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


from lightning_landscape import FlatnessMonitor
from tests.helpers import RunAtTrainStart, finish_script, fit_one_step


class AtStart(RunAtTrainStart, FlatnessMonitor):
    pass


if __name__ == "__main__":
    out, devices = sys.argv[1], int(sys.argv[2])
    monitor = AtStart(
        measures=["lambda_max", "top_eigenvalues", "lambda_min", "trace", "sam_sharpness", "gradient_noise"],
        every_n_epochs=None,
        at_fit_end=False,
        probe_size=64,
        probe_batch_size=16,
        tol=1e-6,
        top_k=3,
    )
    trainer = fit_one_step(devices, [monitor])
    published = float(trainer.callback_metrics["landscape/flatness/lambda_max"])
    finish_script(trainer, out, {"history": monitor.history, "published": published, "world": trainer.world_size})
