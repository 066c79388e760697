"""Harness for real multi-process DDP tests: run a script in a fresh Python, read the JSON it writes.

``strategy="ddp"`` re-launches ``sys.argv`` for every extra rank; inside pytest that would re-run pytest,
so each DDP test is a script under ``tests/ddp_scripts/`` run with :func:`run_ddp_script`. The script gets
the output path and the number of processes as arguments and writes its result (on rank 0) as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "ddp_scripts"


def run_ddp_script(name: str, tmp_path: Path, devices: int = 2, *extra: str, timeout: float = 300) -> dict[str, Any]:
    """Run ``tests/ddp_scripts/<name>.py OUT DEVICES [extra...]`` and return the JSON it wrote to OUT."""
    out = tmp_path / f"{name}-{devices}.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(WANDB_MODE="offline", PL_DISABLE_FORK="1", OMP_NUM_THREADS="1")
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / f"{name}.py"), str(out), str(devices), *extra],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0 or not out.exists():
        output = f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        raise AssertionError(f"DDP script {name} failed ({proc.returncode}):\n{output}")
    return json.loads(out.read_text())
