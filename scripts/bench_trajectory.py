"""Benchmark: TrajectoryRecorder overhead at its default settings, and disk bytes per step.

Side by side in one run, interleaved, best of ``--repeats``: training without and with
``TrajectoryRecorder()`` (sketch k=256 every step, snapshot every 500 steps, flush every 100) on
  * the MNIST-MLP config (784-256-128-10, 235k parameters, batch 128), and
  * a ~1M-parameter MLP (784-1024-256-10, 1.07M parameters) on the same data,
with MNIST-format random images of the real size (the cost does not depend on pixel values). The one-off
work at the end of training (last flush, the trajectory figure) is timed and reported separately.

Usage: python scripts/bench_trajectory.py [--epochs 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import lightning_landscape  # noqa: F401  (first)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from lightning_landscape import TrajectoryRecorder, TrajectoryStore
from scripts.common import mnist_mlp, side_by_side, write_synthetic_mnist


class EndTimed(TrajectoryRecorder):
    """The recorder, timing its one-off end-of-training work (flush, figure) separately, and the time spent inside
    its per-step hooks (the overhead it causes directly, which the noisy side-by-side difference brackets)."""

    def __init__(self, seconds: list, hook_seconds: list, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seconds, self.hook_seconds = seconds, hook_seconds
        self._in_hooks = 0.0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        start = time.perf_counter()
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self._in_hooks += time.perf_counter() - start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        start = time.perf_counter()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._in_hooks += time.perf_counter() - start

    def on_train_end(self, trainer, pl_module) -> None:
        start = time.perf_counter()
        super().on_train_end(trainer, pl_module)
        self.seconds.append(time.perf_counter() - start)
        self.hook_seconds.append(self._in_hooks)


MODELS = {"MNIST-MLP (235k)": (256, 128), "MLP-1M (1.07M)": (1024, 256)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.epochs} epochs, best of {args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_mnist(tmp)
        for label, hidden in MODELS.items():
            stores, end_seconds, hook_seconds = [], [], []

            def callbacks(stores=stores, end_seconds=end_seconds, hook_seconds=hook_seconds, label=label):
                stores.append(str(Path(tmp) / f"store-{label[:4]}-{len(stores)}"))
                return [EndTimed(end_seconds, hook_seconds, store_dir=stores[-1], log_artifact=False)]

            plain, observed = side_by_side(
                tmp, lambda hidden=hidden: mnist_mlp(hidden), callbacks, args.epochs, args.repeats
            )
            store = TrajectoryStore.open(stores[-1])
            chunks = store.disk_bytes(("chunks",)) / len(store.steps)
            snaps = store.disk_bytes(("snapshots",))
            end = min(end_seconds)
            training = observed - end
            print(
                f"{label:17}: {plain:6.2f} s without, {observed:6.2f} s with TrajectoryRecorder();"
                f" during training {training:6.2f} s: overhead {100 * (training / plain - 1):+5.1f}%"
                f" (inside its per-step hooks: {min(hook_seconds):.3f} s = {100 * min(hook_seconds) / plain:.1f}%),"
                f" plus {end:.2f} s once at the end (figure); {len(store.steps)} steps,"
                f" {chunks:,.0f} B/step (statistics + sketch), snapshots {snaps / 2**20:.1f} MB"
                f" ({len(store.snapshot_steps) + 1} incl. init)"
            )


if __name__ == "__main__":
    main()
