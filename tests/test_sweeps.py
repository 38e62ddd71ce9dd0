"""Sweeps: Hydra multirun (also over DDP jobs) and scripts/sweep_ratios.sh, one run dir per job."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import QUIET, TINY_DATA, TINY_MODEL, ok, slm
from tests.test_distributed import CPU_DDP

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["trainer.max_steps=3", "trainer.val_check_interval=3"]


def summaries(sweep_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/summary.json"))}


def tokens_per_step() -> int:
    return 4 * 32  # data.batch_size=4 windows of model.block_size=32 (TINY_DATA, TINY_MODEL)


def test_multirun_runs_jobs_one_after_another(tiny_data: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    ok(slm("train", "-m", "+experiment=eslm_tiny", "selection.alpha=0.2,0.4,0.6", f"hydra.sweep.dir={sweep}",
           f"paths.data_dir={tiny_data}", *TINY_DATA, *TINY_MODEL, *QUIET, *SHORT, cwd=tmp_path))
    runs = summaries(sweep)
    assert sorted(runs) == ["0", "1", "2"]
    for job, alpha in zip(("0", "1", "2"), (0.2, 0.4, 0.6), strict=True):
        assert runs[job]["steps"] == 3
        assert runs[job]["selected_tokens"] == 3 * math.ceil((1 - alpha) * tokens_per_step() - 1e-9)
        config = yaml.safe_load((sweep / job / ".hydra" / "config.yaml").read_text())
        assert config["selection"]["alpha"] == alpha and config["task_name"] == "eslm_tiny"


def test_multirun_over_experiments(tiny_data: Path, tmp_path: Path) -> None:
    """`-m experiment=a,b` sweeps over experiments (the group is in train.yaml's defaults), each job
    composing its own. (`-m +experiment=...`, read as the same: the test above.)"""
    sweep = tmp_path / "sweep"
    ok(slm("train", "-m", "experiment=clm_tiny,random_tiny", f"hydra.sweep.dir={sweep}", f"paths.data_dir={tiny_data}",
           *TINY_DATA, *TINY_MODEL, *QUIET, "trainer.max_steps=1", "trainer.val_check_interval=1", cwd=tmp_path))
    runs = summaries(sweep)
    assert [runs[job]["selection"] for job in ("0", "1")] == ["clm", "random"]
    for job, name in (("0", "clm_tiny"), ("1", "random_tiny")):
        assert yaml.safe_load((sweep / job / ".hydra" / "config.yaml").read_text())["task_name"] == name
        assert f"experiment={name}" in yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text())


def test_multirun_of_ddp_jobs_relaunches_each_job_in_its_own_dir(tiny_data: Path, tmp_path: Path) -> None:
    """Each job's second rank starts with that job's overrides (not the whole sweep) in that job's
    dir, and the second job launches its ranks afresh instead of waiting for the first job's."""
    sweep = tmp_path / "sweep"
    ok(slm("train", "-m", "seed=1,2", f"hydra.sweep.dir={sweep}", f"paths.data_dir={tiny_data}", *TINY_DATA,
           *TINY_MODEL, *QUIET, *SHORT, "data.batch_size=2", *CPU_DDP, cwd=tmp_path, timeout=300))
    runs = summaries(sweep)
    assert sorted(runs) == ["0", "1"]
    assert runs["0"]["val_loss"] != runs["1"]["val_loss"]  # different seeds
    for job in ("0", "1"):
        assert runs[job]["train_tokens"] == 3 * tokens_per_step()
        assert (sweep / job / "train_ddp_process_1.log").is_file()
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "multirun.yaml"]
    assert not (tmp_path / "outputs").exists()  # no stray run dirs from the relaunched ranks


def test_sweep_ratios_script(tiny_data: Path, tmp_path: Path) -> None:
    root = tmp_path / "ratios"
    env = {**os.environ, "SLM": f"{sys.executable} -m slm_cli"}
    proc = subprocess.run(
        [str(ROOT / "scripts" / "sweep_ratios.sh"), "-s", "clm random eslm", "-r", "0.25 0.5", "-n", "1 2",
         "-o", str(root), "--", f"paths.data_dir={tiny_data}", *TINY_DATA, *TINY_MODEL, *QUIET,
         "trainer.max_steps=1", "trainer.val_check_interval=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    clm, random, eslm = (summaries(root / s) for s in ("clm", "random", "eslm"))
    assert len(clm) == 2 and len(random) == 4 and len(eslm) == 4  # seeds; ratios x seeds
    m = tokens_per_step()
    assert {r["selected_tokens"] for r in clm.values()} == {m}
    for runs in (random, eslm):  # jobs: ratio-major (0.25 seed 1, 0.25 seed 2, 0.5 ...)
        kept = [runs[str(j)]["selected_tokens"] for j in range(4)]
        assert kept == [m // 4, m // 4, m // 2, m // 2]
    assert {r["selection"] for r in eslm.values()} == {"eslm"}


def test_sweep_ratios_script_rejects_bad_input(tmp_path: Path) -> None:
    for args, words in ((["-r", "1.5"], "ratio 1.5 must be in (0, 1)"), (["-s", "nope"], "unknown strategy 'nope'")):
        proc = subprocess.run([str(ROOT / "scripts" / "sweep_ratios.sh"), *args, "-o", str(tmp_path / "x")],
                              cwd=tmp_path, env={**os.environ, "SLM": "false"}, capture_output=True, text=True)
        assert proc.returncode == 2 and words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_wandb_runs_follow_run_dirs_and_sweeps(tiny_data: Path, tmp_path: Path) -> None:
    """Each job of a sweep is its own W&B run, named after its overrides and grouped by the sweep;
    a job that continues in its run dir (a requeue) continues the same W&B run (offline mode)."""
    import torch

    pytest.importorskip("wandb")
    sweep = tmp_path / "sweep"
    ok(slm("train", "-m", "logger=wandb", "seed=1,2", f"hydra.sweep.dir={sweep}", f"paths.data_dir={tiny_data}",
           *TINY_DATA, *TINY_MODEL, *QUIET, "trainer.max_steps=1", "trainer.val_check_interval=1", cwd=tmp_path,
           env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"}))
    names = {}
    for job in ("0", "1"):
        w = torch.load(sweep / job / "checkpoints" / "last.ckpt", weights_only=True)["slm"]["config"]["logger"]["wandb"]
        names[job] = w
        runs = list((sweep / job / "wandb").glob(f"offline-run-*-{w['id']}"))
        assert len(runs) == 1, list((sweep / job / "wandb").iterdir())
        assert w["group"] == f"train/{sweep.name}" and f"seed={int(job) + 1}" in w["name"]
    assert names["0"]["id"] != names["1"]["id"] and names["0"]["name"] != names["1"]["name"]
    ok(slm("train", "logger=wandb", "seed=1", f"hydra.run.dir={sweep}/0", f"paths.data_dir={tiny_data}", *TINY_DATA,
           *TINY_MODEL, *QUIET, "trainer.max_steps=2", "trainer.val_check_interval=1", cwd=tmp_path,
           env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"}))
    assert len(list((sweep / "0" / "wandb").glob(f"offline-run-*-{names['0']['id']}"))) == 2  # the same W&B run
