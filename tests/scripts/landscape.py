"""LandscapeSampler under DDP: the grid split over ranks and gathered equals the 1-process grid.

Usage: python landscape.py OUT.json DEVICES
"""

import json
import sys
from pathlib import Path

import lightning_landscape  # noqa: F401  (first)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning.pytorch as pl
import numpy as np
import torch

from lightning_landscape import LandscapeSampler
from tests.helpers import loader, tiny_module_class


class AtStart(LandscapeSampler):
    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        self.run_now(trainer, pl_module)  # step 0: the same parameters for any number of ranks


if __name__ == "__main__":
    out, devices = sys.argv[1], int(sys.argv[2])
    pl.seed_everything(0)
    sampler = AtStart(resolution=7, line_points=9, at_fit_end=False, probe_size=48, probe_batch_size=16)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[sampler],
        default_root_dir=str(Path(out).parent / f"root-{devices}"),
    )
    trainer.fit(tiny_module_class()(), train_dataloaders=loader(96, 16))
    if trainer.is_global_zero:
        saved = np.load(sampler.reporter.run_dir / "landscape-step0000000.npz")
        Path(out).write_text(
            json.dumps(
                {"plane": saved["plane"].tolist(), "profile": saved["profile"].tolist(), "history": sampler.history}
            )
        )
    if torch.distributed.is_initialized():  # gloo aborts at interpreter exit if the group is left open
        torch.distributed.destroy_process_group()
