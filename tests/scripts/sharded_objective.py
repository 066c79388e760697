"""A callback's collectives under DDP: probe set sharded over ranks, sums and gathers through the strategy.

Usage: python sharded_objective.py OUT.json DEVICES
"""

import sys
from pathlib import Path

import lightning_landscape  # noqa: F401  (first)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from lightning_landscape import distributed
from lightning_landscape.callbacks.base import LandscapeCallback
from tests.helpers import RunAtTrainStart, finish_script, fit_one_step


def weighted_mean(strategy, value, n_local):
    """``sum_r n_r value_r / sum_r n_r``: each rank's mean over its ``n_local`` probe samples, as the global mean."""
    total = distributed.reduce_sum(strategy, torch.tensor(float(n_local), dtype=value.dtype))
    return distributed.reduce_sum(strategy, value * n_local) / total


class ShardedAnalysis(RunAtTrainStart, LandscapeCallback):
    name = "sharded"

    def analyze(self, trainer, pl_module, step):
        s = trainer.strategy
        obj = self.objective(trainer, pl_module)
        n_local = sum(obj.batch_sizes)
        v = torch.linspace(-1, 1, obj.numel)
        thetas = obj.theta0 + 0.1 * torch.randn(7, obj.numel, generator=torch.Generator().manual_seed(1))
        rank, world = distributed.world(s)
        mine = distributed.shard(len(thetas), rank, world)
        self.result = {
            "world": world,
            "n_total": int(distributed.reduce_sum(s, torch.tensor(n_local))),
            "loss": float(weighted_mean(s, obj.loss(), n_local)),
            "grad": weighted_mean(s, obj.grad(), n_local).tolist(),
            "hvp": weighted_mean(s, obj.hvp(None, v), n_local).tolist(),
            "losses": weighted_mean(s, obj.losses(thetas), n_local).tolist(),
            "gathered": distributed.gather_rows(s, thetas[mine.start : mine.stop] @ v).tolist(),
            "expected_gathered": (thetas @ v).tolist(),
            "broadcast": distributed.broadcast(s, f"from rank {rank}"),
        }


if __name__ == "__main__":
    out, devices = sys.argv[1], int(sys.argv[2])
    callback = ShardedAnalysis(probe={"size": 64, "batch_size": 16}, at_fit_end=False)
    trainer = fit_one_step(devices, [callback])
    finish_script(trainer, out, callback.result)
