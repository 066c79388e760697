"""TrajectoryRecorder in a fresh process: full run, SIGKILL mid-training, resume from the checkpoint, DDP.

Usage: python trajectory.py OUT.json DEVICES MODE ROOT      MODE: full | kill | resume
The store goes to ROOT/<MODE-group>/store, checkpoints to ROOT/<group>/ckpt (kill and resume share a group).
"""

import json
import os
import signal
import sys
from pathlib import Path

import lightning_landscape  # noqa: F401  (first)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, DistributedSampler

from lightning_landscape import TrajectoryRecorder
from tests.helpers import blobs, tiny_module_class


class SameGlobalBatches(pl.LightningDataModule):
    """Rank r of w gets samples r, r + w, ... of each global batch of 8: the union is the 1-process batch."""

    def train_dataloader(self):
        world, rank = self.trainer.world_size, self.trainer.global_rank
        data = blobs(96)
        return DataLoader(data, 8 // world, sampler=DistributedSampler(data, world, rank, shuffle=False))


class KillAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    out, devices, mode, root = sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    group = root / ("crash" if mode in ("kill", "resume") else f"{mode}-{devices}")
    pl.seed_everything(0)
    recorder = TrajectoryRecorder(
        sketch_dim=64,
        sketch_every_n_steps=4,
        vector_stats_every_n_steps=4,
        flush_every_n_steps=5,
        snapshot_every_n_steps=12,
        store_dir=str(group / "store"),
    )
    callbacks = [recorder, ModelCheckpoint(dirpath=group / "ckpt", save_last=True, save_top_k=-1)]
    if mode == "kill":
        callbacks.append(KillAt(18))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=group,
        use_distributed_sampler=False,
    )
    model = tiny_module_class()(batch_norm=False, dropout=0.0)
    trainer.fit(
        model, datamodule=SameGlobalBatches(), ckpt_path=group / "ckpt" / "last.ckpt" if mode == "resume" else None
    )
    if trainer.is_global_zero:
        Path(out).write_text(json.dumps({"store": recorder.store_dir, "steps": trainer.global_step}))
    if torch.distributed.is_initialized():  # gloo aborts at interpreter exit if the group is left open
        torch.distributed.destroy_process_group()
