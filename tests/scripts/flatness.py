"""FlatnessMonitor under DDP: probe set sharded, Hessian-vector products summed over ranks.

Usage: python flatness.py OUT.json DEVICES
"""

import json
import sys
from pathlib import Path

import lightning_landscape  # noqa: F401  (first)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning.pytorch as pl
import torch

from lightning_landscape import FlatnessMonitor
from tests.helpers import loader, tiny_module_class


class AtStart(FlatnessMonitor):
    def on_train_start(self, trainer, pl_module):
        self.run_now(trainer, pl_module)  # step 0: the same parameters for any number of ranks


if __name__ == "__main__":
    out, devices = sys.argv[1], int(sys.argv[2])
    pl.seed_everything(0)
    monitor = AtStart(
        measures=["lambda_max", "top_eigenvalues", "lambda_min", "trace", "sam_sharpness", "gradient_noise"],
        every_n_epochs=None,
        at_fit_end=False,
        probe_size=64,
        probe_batch_size=16,
        tol=1e-6,
        top_k=3,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
    )
    trainer.fit(tiny_module_class()(), train_dataloaders=loader(96, 16))
    published = float(trainer.callback_metrics["landscape/flatness/lambda_max"])
    if trainer.is_global_zero:
        Path(out).write_text(
            json.dumps({"history": monitor.history, "published": published, "world": trainer.world_size})
        )
    if torch.distributed.is_initialized():  # gloo aborts at interpreter exit if the group is left open
        torch.distributed.destroy_process_group()
