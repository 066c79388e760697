"""What each callback costs at its defaults on networks users train: ResNet-20 on CIFAR-shaped random data, and a
GPT-2-style causal language model of 13.8M parameters built from a config on random tokens (``--model gpt``).

Every configuration runs in its own process (so that the peak resident memory is its own), side by side with the
bare fit of the same process: fit seconds without and with the callback(s), the overhead, the seconds of the
callback's triggers and their cost in training steps, and the peak RSS. The callbacks take their defaults, with
their default budgets (a share of training time with a 10 s floor per trigger).

Usage::

    python scripts/bench_scale.py                     # all configurations, a Markdown table
    python scripts/bench_scale.py --samples 4096 --epochs 3
    python scripts/bench_scale.py --one flatness      # one configuration, JSON
    python scripts/bench_scale.py --model gpt --samples 512 --epochs 1 --configs none "all four"
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

import lightning_landscape  # noqa: F401  (first: torchvision shim)

CONFIGS = ("none", "recorder", "flatness", "sampler", "energy", "all four")


def gpt_outputs(module: Any, batch: dict) -> Any:
    """The GPT's logits on a dict batch: what EnergyLandscape fingerprints minima by (its default, ``module(batch[0])``,
    needs a tuple batch; it says so at the start of training)."""
    return module(batch["input_ids"][:, :-1])


def callbacks_for(name: str, model: str = "resnet20") -> list:
    from lightning_landscape import EnergyLandscape, FlatnessMonitor, LandscapeSampler, TrajectoryRecorder

    extra = {EnergyLandscape: {"probe": {"outputs_fn": gpt_outputs}}} if model == "gpt" else {}
    make = {
        "recorder": TrajectoryRecorder,
        "flatness": FlatnessMonitor,
        "sampler": LandscapeSampler,
        "energy": EnergyLandscape,
    }
    chosen = list(make.values()) if name == "all four" else [] if name == "none" else [make[name]]
    return [c() if c is TrajectoryRecorder else c(progress=False, **extra.get(c, {})) for c in chosen]


def gpt(vocab: int = 8192, width: int = 384, depth: int = 6, heads: int = 6, context: int = 128) -> Any:
    """A GPT-2-style causal language model built from its config (no download): token and position embeddings,
    ``depth`` pre-norm blocks with causal SDPA attention, the output head tied to the token embedding; 13.8M
    parameters at the defaults. Trained with AdamW on dict batches ``{"input_ids": (B, context + 1)}``."""
    import lightning.pytorch as pl
    import torch
    from torch import nn

    class GPT(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(context, width)
            block = dict(d_model=width, nhead=heads, dim_feedforward=4 * width, dropout=0.0, batch_first=True)
            self.blocks = nn.ModuleList(
                [nn.TransformerEncoderLayer(**block, norm_first=True, activation="gelu") for _ in range(depth)]
            )
            self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab, bias=False)
            self.head.weight = self.tokens.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1])
            h = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
            for block in self.blocks:
                h = block(h, src_mask=mask, is_causal=True)
            return self.head(self.norm(h))

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            ids = batch["input_ids"]
            logits = self(ids[:, :-1])
            return nn.functional.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=3e-4, weight_decay=0.1)

    return GPT()


class Tokens:
    """Random token sequences as dict batches (a map-style dataset, so the probe sets can be drawn by index)."""

    def __init__(self, n: int, vocab: int = 8192, context: int = 128) -> None:
        import torch

        self.ids = torch.randint(0, vocab, (n, context + 1), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i]}


def fit(callbacks: list, samples: int, epochs: int, root: str, model_name: str = "resnet20") -> tuple[float, float]:
    """Seconds of ``Trainer.fit`` of ResNet-20 (SGD, batch 128) or the GPT (AdamW, batch 16 of 128 tokens) and the
    seconds its analyses took."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_landscape.examples import Classifier, cifar_resnet

    pl.seed_everything(0)
    if model_name == "gpt":
        data, batch_size, model = Tokens(samples), 16, gpt()
    else:
        data = TensorDataset(torch.randn(samples, 3, 32, 32), torch.randint(0, 10, (samples,)))
        batch_size, model = 128, Classifier(cifar_resnet(20), lr=0.1, momentum=0.9)
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
    trainer.fit(model, DataLoader(data, batch_size=batch_size, shuffle=True))
    seconds = time.perf_counter() - start
    analysis = sum(getattr(c, "_spent", 0.0) for c in callbacks)
    return seconds, analysis


def one(name: str, samples: int, epochs: int, root: str, model: str) -> dict:
    bare, _ = fit([], samples, epochs, root, model)
    observed, analysis = (
        fit(callbacks_for(name, model), samples, epochs, root, model) if name != "none" else (bare, 0.0)
    )
    steps = epochs * -(-samples // (16 if model == "gpt" else 128))
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
    parser.add_argument("--model", choices=("resnet20", "gpt"), default="resnet20")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.samples, args.epochs, args.root, args.model)))
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
        out = subprocess.run([*command, "--root", args.root, "--model", args.model], capture_output=True, text=True)
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
