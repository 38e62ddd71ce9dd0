"""Shared test helpers: run the `slm` CLI in a subprocess and tiny run settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# A model and corpus small enough that a step takes milliseconds on a CPU.
TINY_DATA = [
    "data.name=tiny", "data.max_bytes=300000", "data.vocab_size=512", "data.batch_size=4",
]
TINY_MODEL = ["model.block_size=32", "model.n_layer=2", "model.n_head=2", "model.n_embd=64"]
QUIET = ["trainer.enable_progress_bar=false", "trainer.limit_val_batches=4"]


def slm(*args: str, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m slm_cli ARGS` (the same code path as the `slm` console script)."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None) if not env or "HYDRA_FULL_ERROR" not in env else None
    return subprocess.run([sys.executable, "-m", "slm_cli", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}"
    return proc


def train(run_dir: Path, data_dir: Path, *overrides: str, cwd: Path) -> dict:
    """A tiny training run; returns its summary.json."""
    ok(slm("train", f"hydra.run.dir={run_dir}", f"paths.data_dir={data_dir}", *TINY_DATA, *TINY_MODEL, *QUIET,
           *overrides, cwd=cwd))
    return json.loads((run_dir / "summary.json").read_text())
