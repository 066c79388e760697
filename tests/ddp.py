"""Harness for tests that need a fresh process: real multi-process DDP, SIGKILL, resume.

``strategy="ddp"`` re-launches ``sys.argv`` for every extra rank; inside pytest that would re-run pytest,
so each such test is a script under ``tests/scripts/`` run with :func:`run_script`. The script gets the
output path and the number of processes as arguments (and any extra ones) and writes its result (on
rank 0) as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "scripts"


def run_script(
    name: str, tmp_path: Path, devices: int = 2, *extra: str, timeout: float = 300, expect_kill: bool = False
) -> dict[str, Any]:
    """Run ``tests/scripts/<name>.py OUT DEVICES [extra...]`` and return the JSON it wrote to OUT.

    With ``expect_kill`` the script must die by SIGKILL, and nothing is read.
    """
    out = tmp_path / f"{name}-{devices}-{'-'.join(e for e in extra if '/' not in e)}.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(WANDB_MODE="offline", PL_DISABLE_FORK="1", OMP_NUM_THREADS="1")
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "WANDB_SERVICE"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / f"{name}.py"), str(out), str(devices), *extra],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if expect_kill:
        assert proc.returncode == -9, f"expected SIGKILL, got {proc.returncode}:\n{proc.stderr[-3000:]}"
        return {}
    if proc.returncode != 0 or not out.exists():
        output = f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        raise AssertionError(f"DDP script {name} failed ({proc.returncode}):\n{output}")
    return json.loads(out.read_text())
