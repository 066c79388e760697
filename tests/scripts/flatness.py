"""FlatnessMonitor under DDP: probe set sharded, Hessian-vector products summed over ranks.

Usage: python flatness.py OUT.json DEVICES
"""

import sys
from pathlib import Path

import lightning_landscape  # noqa: F401  (first)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


from lightning_landscape import FlatnessMonitor
from tests.helpers import RunAtTrainStart, finish_script, fit_one_step

#: the monitor of the DDP and FSDP2 scripts, run once at step 0
SETTINGS = {
    "measures": ["lambda_max", "top_eigenvalues", "lambda_min", "trace", "sam_sharpness", "gradient_noise"],
    "every_n_epochs": None,
    "at_fit_end": False,
    "probe": {"size": 64, "batch_size": 16},
    "spectrum": {"tol": 1e-6, "top_k": 3},
}


class AtStart(RunAtTrainStart, FlatnessMonitor):
    pass


class FailsOnRankOne(AtStart):
    """Rank 1's Hessian-vector products raise: a failure while serving rank 0 must not hang either rank."""

    def objective(self, trainer, pl_module):
        obj = super().objective(trainer, pl_module)
        if trainer.global_rank == 1:

            def broken(theta=None):
                raise RuntimeError("rank 1 exploded")

            obj.hvp_at = broken
        return obj


if __name__ == "__main__":
    out, devices = sys.argv[1], int(sys.argv[2])
    fail = len(sys.argv) > 3 and sys.argv[3] == "fail"
    monitor = (FailsOnRankOne if fail else AtStart)(**SETTINGS)
    trainer = fit_one_step(devices, [monitor])
    published = float(trainer.callback_metrics.get("landscape-flatness/lambda_max", float("nan")))
    result = {"history": monitor.history, "published": published, "world": trainer.world_size}
    finish_script(trainer, out, {**result, "failures": monitor.failures, "steps": trainer.global_step})
