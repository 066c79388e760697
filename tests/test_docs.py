"""The documentation: it builds without warnings, and every Python example in the README and in docs/ runs."""

import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import wandb
from lightning.pytorch.loggers import WandbLogger

from tests.helpers import loader, tiny_module_class

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.M | re.S)


@pytest.mark.slow
def test_the_docs_build_without_warnings(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("ProbeSpec") > 0


class Data(pl.LightningDataModule):
    def train_dataloader(self):
        return loader(64, batch_size=16)


class ShortTrainer(pl.Trainer):
    """The examples' Trainer, for a few steps on CPU without a progress bar."""

    def __init__(self, **kwargs):
        super().__init__(**{"max_steps": 4, "accelerator": "cpu", "enable_progress_bar": False, **kwargs})


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_every_python_example_runs(page, monkeypatch):
    monkeypatch.setattr(pl, "Trainer", ShortTrainer)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    x, y = torch.randn(8, 3), torch.randint(0, 3, (8,))
    theta = torch.cat([p.reshape(-1) for p in net.parameters()])
    names = {"model": tiny_module_class()(), "dm": Data(), "L": pl, "WandbLogger": WandbLogger, "F": F}
    names.update(torch=torch, net=net, x=x, y=y, v=torch.randn_like(theta), d=torch.randn_like(theta))
    try:
        for block in python_blocks(page):
            exec(compile(block, f"{page.name} example", "exec"), names)
    finally:
        wandb.finish()  # an example's WandbLogger run must not stay open for the next test
