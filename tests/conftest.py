"""Test setup: lightning_landscape first (torchvision on CPU torch), W&B offline in a temporary folder."""

import os
import tempfile

import pytest

import lightning_landscape  # noqa: F401  (must precede lightning: see lightning_landscape/_compat.py)

_WANDB_HOME = tempfile.mkdtemp(prefix="ll-wandb-")
os.environ["WANDB_MODE"] = "offline"  # read once per process
os.environ.setdefault("WANDB_SILENT", "true")
for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
    os.environ[var] = _WANDB_HOME


def pytest_sessionfinish(session, exitstatus):
    """Remove this session's W&B folder (the offline runs that tests check live under their own tmp_path)."""
    import shutil

    shutil.rmtree(_WANDB_HOME, ignore_errors=True)


@pytest.fixture(autouse=True)
def _in_its_own_folder(tmp_path, monkeypatch):
    """Every test runs in its own temporary folder: whatever a Trainer, a logger or an example writes to the current
    directory (a run folder by default) lands under ``tmp_path``, never in the checkout."""
    monkeypatch.chdir(tmp_path)
