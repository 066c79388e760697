"""What each callback costs at its defaults on a network users train: ResNet-20 on CIFAR-shaped random data.

Every configuration runs in its own process (so that the peak resident memory is its own), side by side with the
bare fit of the same process: fit seconds without and with the callback(s), the overhead, the seconds of the
callback's triggers and their cost in training steps, and the peak RSS. The callbacks take their defaults, with
their default budgets (a share of training time with a 10 s floor per trigger).

Usage::

    python scripts/bench_scale.py                     # all configurations, a Markdown table
    python scripts/bench_scale.py --samples 4096 --epochs 3
    python scripts/bench_scale.py --one flatness      # one configuration, JSON
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import lightning_landscape  # noqa: F401  (first: torchvision shim)

CONFIGS = ("none", "recorder", "flatness", "sampler", "energy", "all four")


def callbacks_for(name: str) -> list:
    from lightning_landscape import EnergyLandscape, FlatnessMonitor, LandscapeSampler, TrajectoryRecorder

    make = {
        "recorder": TrajectoryRecorder,
        "flatness": FlatnessMonitor,
        "sampler": LandscapeSampler,
        "energy": EnergyLandscape,
    }
    if name == "none":
        return []
    if name == "all four":
        return [m(progress=False) if m is not TrajectoryRecorder else m() for m in make.values()]
    return [make[name](progress=False) if name != "recorder" else make[name]()]


def fit(callbacks: list, samples: int, epochs: int, root: str) -> tuple[float, float]:
    """Seconds of ``Trainer.fit`` of ResNet-20 (SGD, batch 128) and the seconds its analyses took."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_landscape.examples import Classifier, cifar_resnet

    pl.seed_everything(0)
    data = TensorDataset(torch.randn(samples, 3, 32, 32), torch.randint(0, 10, (samples,)))
    model = Classifier(cifar_resnet(20), lr=0.1, momentum=0.9)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=root,
    )
    start = time.perf_counter()
    trainer.fit(model, DataLoader(data, batch_size=128, shuffle=True))
    seconds = time.perf_counter() - start
    analysis = sum(getattr(c, "_spent", 0.0) for c in callbacks)
    return seconds, analysis


def one(name: str, samples: int, epochs: int, root: str) -> dict:
    bare, _ = fit([], samples, epochs, root)
    observed, analysis = fit(callbacks_for(name), samples, epochs, root) if name != "none" else (bare, 0.0)
    steps = epochs * -(-samples // 128)
    return {
        "config": name,
        "bare_s": bare,
        "with_s": observed,
        "overhead": observed / bare - 1,
        "analysis_s": analysis,
        "analysis_steps": analysis / (bare / steps),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--one", choices=CONFIGS)
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--root", default="/tmp/bench_scale")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.samples, args.epochs, args.root)))
        return
    print("| callbacks | bare -> with | overhead | analyses | = training steps | peak RSS |")
    print("|---|---|---|---|---|---|")
    for name in args.configs:
        command = [
            sys.executable,
            __file__,
            "--one",
            name,
            "--samples",
            str(args.samples),
            "--epochs",
            str(args.epochs),
        ]
        out = subprocess.run([*command, "--root", args.root], capture_output=True, text=True)
        if out.returncode:
            print(f"| {name} | failed: {out.stderr.strip().splitlines()[-1]} |||||")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"| {name} | {r['bare_s']:.1f} -> {r['with_s']:.1f} s | {r['overhead']:+.0%} | {r['analysis_s']:.1f} s"
            f" | {r['analysis_steps']:.0f} | {r['peak_rss_mb']:,.0f} MB |",
            flush=True,
        )


if __name__ == "__main__":
    main()
