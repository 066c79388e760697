"""FlatnessMonitor under FSDP2 (ModelParallelStrategy, ``fully_shard``): the parameters gathered on every rank, the
probe set sharded and Hessian-vector products summed over the data-parallel ranks, as under DDP.

Usage: python fsdp.py OUT.json DEVICES
"""

import sys
from pathlib import Path

import lightning_landscape  # noqa: F401  (first)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from torch import nn

from lightning_landscape import FlatnessMonitor, sharding
from tests.helpers import finish_script, fit_one_step, fsdp2_strategy, sharded_module_class
from tests.scripts.flatness import SETTINGS


class AtStart(FlatnessMonitor):
    """Runs at step 0 (the weights every number of ranks shares) and records what the run left of the module."""

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        before = sharding.full_parameters(pl_module)
        self.run_now(trainer, pl_module)
        after = sharding.full_parameters(pl_module)
        self.unchanged = all(torch.equal(before[n], after[n]) for n in before)
        self.sharded = sharding.is_sharded(pl_module)
        self.local = [p.to_local().numel() for p in pl_module.parameters()]
        from lightning_landscape.curvature import memory

        real, memory.free_bytes = memory.free_bytes, lambda device: 100
        try:
            sharding.check_gatherable(pl_module, "FlatnessMonitor")
            self.refusal = ""
        except MemoryError as err:
            self.refusal = str(err)
        finally:
            memory.free_bytes = real
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        parallel = parallelize_module(
            nn.Sequential(nn.Linear(3, 4)), pl_module.device_mesh["tensor_parallel"], {"0": ColwiseParallel()}
        )
        try:
            sharding.check_gatherable(parallel, "FlatnessMonitor")
            self.tensor_parallel = ""
        except ValueError as err:
            self.tensor_parallel = str(err)


if __name__ == "__main__":
    out, devices = sys.argv[1], int(sys.argv[2])
    monitor = AtStart(**SETTINGS)
    trainer = fit_one_step(devices, [monitor], module_class=sharded_module_class(), strategy=fsdp2_strategy(devices))
    published = float(trainer.callback_metrics.get("landscape-flatness/lambda_max", float("nan")))
    result = {
        "history": monitor.history,
        "published": published,
        "world": trainer.world_size,
        "failures": monitor.failures,
        "steps": trainer.global_step,
        "unchanged": monitor.unchanged,
        "sharded": monitor.sharded,
        "local": monitor.local,
        "refusal": monitor.refusal,
        "tensor_parallel": monitor.tensor_parallel,
        "sharded_after_training": sharding.is_sharded(trainer.lightning_module),
    }
    finish_script(trainer, out, result)
