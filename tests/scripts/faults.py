"""One-rank failures in every stage of an analysis, under real 2-process DDP: no rank may hang, every rank must skip.

Usage: python faults.py OUT.json DEVICES CALLBACK  (CALLBACK: flatness, landscape, energy, batchnorm)

Trigger ``k`` (one per optimizer step) runs with the ``k``-th entry of ``FAULTS[CALLBACK]`` injected: the named
function raises on the named rank only. The last trigger runs with no fault and must succeed. The process group
times out after 60 s, so a hang fails the script instead of blocking the test suite.
"""

import importlib
import sys
from datetime import timedelta
from pathlib import Path

import lightning_landscape  # noqa: F401  (first)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy

from lightning_landscape import EnergyLandscape, FlatnessMonitor, LandscapeSampler, TrajectoryRecorder
from tests.helpers import finish_script, loader, tiny_module_class

#: (module, attribute path, rank) per trigger
FAULTS = {
    "flatness": [
        ("lightning_landscape.objective", "Objective.loss", 1),  # building the probe objective
        ("lightning_landscape.curvature", "gradient_moments", 1),
        ("lightning_landscape.curvature", "gradient_noise", 0),
        ("lightning_landscape.curvature", "hessian_eigenvalues", 0),  # the estimator on rank 0
        ("lightning_landscape.report.reporter", "Reporter.arrays", 0),  # after the last collective
    ],
    "landscape": [
        ("lightning_landscape.callbacks.sampler", "random_direction", 1),
        ("lightning_landscape.callbacks.sampler", "evaluate_slice", 1),
        ("lightning_landscape.dynamics", "TrajectoryStore.open", 0),
        ("lightning_landscape.callbacks.sampler", "pca_directions", 0),
        ("lightning_landscape.callbacks.sampler", "interpolate", 1),
    ],
    "energy": [
        ("lightning_landscape.callbacks.energy", "sample", 1),
        ("lightning_landscape.dynamics.excursions", "Excursions.save", 0),
        ("lightning_landscape.callbacks.energy", "quench_point", 1),
        ("lightning_landscape.dynamics.minima", "MinimaDatabase.add", 0),
        ("lightning_landscape.callbacks.energy", "plan_joins", 0),
        ("lightning_landscape.callbacks.energy", "minimum_path", 1),
        ("lightning_landscape.energy.trigger", "markov_model", 0),  # warned about, the trigger stands
    ],
    "batchnorm": [],
}


def boom(*args, **kwargs):
    raise RuntimeError("injected fault")


class Inject(pl.Callback):
    """Before batch ``k``, makes ``FAULTS[k]`` raise on its rank (and undoes the previous one)."""

    def __init__(self, faults):
        self.faults, self.undo = faults, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.undo is not None:
            self.undo()
            self.undo = None
        k = trainer.global_step
        if k < len(self.faults):
            module_name, path, rank = self.faults[k]
            if trainer.global_rank == rank:
                owner = importlib.import_module(module_name)
                *parents, attr = path.split(".")
                for parent in parents:
                    owner = getattr(owner, parent)
                original = owner.__dict__[attr]
                setattr(owner, attr, boom)
                self.undo = lambda owner=owner, attr=attr, original=original: setattr(owner, attr, original)


if __name__ == "__main__":
    out, devices, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    faults = FAULTS[name]
    common = {"every_n_steps": 1, "at_fit_end": False, "probe": {"size": 32}, "progress": False}
    extra = []
    if name == "flatness":
        callback = FlatnessMonitor(measures=["lambda_max", "gradient_noise"], **common)
    elif name == "landscape":
        callback = LandscapeSampler(
            interpolation_steps=3, snapshot_every_n_steps=1, **common, slices={"resolution": 3, "line_points": 3}
        )
        extra = [TrajectoryRecorder(sketch_dim=8, snapshot_every_n_steps=1)]
    elif name == "energy":
        callback = EnergyLandscape(
            **common,
            sampling={"replicas": 2, "steps": 6, "record_every": 1},
            quench={"max_iter": 5, "dedup_tol": 1e-4},
            basins={"merge_barrier": 0.0, "max_linear": 0},  # every pair gets a path (that fails on rank 1)
            paths={"images": 3, "steps": 3},
        )
    else:  # the natural case: rank 1's probe shard ends in a batch of one sample, which BatchNorm cannot train on
        callback = FlatnessMonitor(
            every_n_steps=1, at_fit_end=False, progress=False, probe={"size": 65, "batch_size": 32, "bn_mode": "train"}
        )
    pl.seed_everything(0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=DDPStrategy(timeout=timedelta(seconds=60)),
        max_steps=len(faults) + 1 if faults else 2,
        logger=False,
        default_root_dir=Path(out).parent / name,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Inject(faults), *extra, callback],
    )
    model = tiny_module_class()(batch_norm=name == "batchnorm", dropout=0.0)
    try:
        trainer.fit(model, train_dataloaders=loader(96, 8))
    except Exception as err:  # refused at the start of training, on every rank
        finish_script(trainer, out, {"steps": trainer.global_step, "error": str(err)})
        sys.exit(0)
    counts = trainer.strategy.all_gather(torch.tensor([callback.failures, callback.runs])).tolist()
    failures_file = callback.reporter.run_dir / "failures.jsonl"
    result = {
        "steps": trainer.global_step,
        "failures": [c[0] for c in counts],
        "runs": [c[1] for c in counts],
        "records": failures_file.read_text().splitlines() if failures_file.exists() else [],
    }
    finish_script(trainer, out, result)
