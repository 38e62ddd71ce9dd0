"""scripts/reproduce_small.sh reruns the study skipping finished runs: run against a stand-in `slm`
(it records each call and writes a summary.json for every job a training call makes), a second
call trains nothing, and a job dir removed is trained again, alone. Reference: the study's layout
counted by hand from the script's settings."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The stand-in: `train -m` makes one job per combination of its comma lists (Hydra's basic sweeper;
# a value in braces is one value), keeping jobs that have a summary; `train` makes its run dir;
# `--cfg job` prints the model's block size; every other command does nothing.
FAKE_SLM = r'''#!{python}
import itertools, json, os, sys
from pathlib import Path
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(" ".join(args) + "\n")
if args[:1] != ["train"]:
    sys.exit(0)
if "--cfg" in args:
    print("block_size: 128")
    sys.exit(0)
values = dict(a.split("=", 1) for a in args[1:] if "=" in a)
if "-m" in args:
    lists = [v.split(",") for k, v in values.items() if "," in v and not v.startswith(("{", "["))]
    runs = [Path(values["hydra.sweep.dir"]) / str(i) for i, _ in enumerate(itertools.product(*lists))]
else:
    runs = [Path(values["hydra.run.dir"])]
for run in runs:
    run.mkdir(parents=True, exist_ok=True)
    if not (run / "summary.json").exists():
        (run / "summary.json").write_text(json.dumps({"steps": 1}))
'''

# The Python the script calls: the noise file for real, the results page not at all.
FAKE_PYTHON = r'''#!/usr/bin/env bash
if [ "$1" = -m ]; then echo "$*" >> "$FAKE_LOG"; exit 0; fi
exec {python} "$@"
'''

SETTINGS = {"STEPS": "20", "SEEDS": "1 2", "LENGTHS": "40", "LONG_SEEDS": "1", "KEEPS": "0.4",
            "CLM_FRACTIONS": "0.5", "LANES": "1"}


def executable(path: Path, text: str) -> str:
    path.write_text(text.replace("{python}", sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture()
def study(tmp_path: Path):
    log = tmp_path / "calls.log"
    env = {**os.environ, **SETTINGS, "FAKE_LOG": str(log),
           "SLM": executable(tmp_path / "slm", FAKE_SLM), "PYTHON": executable(tmp_path / "python", FAKE_PYTHON)}
    root = tmp_path / "study"

    def run() -> list[str]:
        log.write_text("")
        done = subprocess.run(["bash", str(ROOT / "scripts" / "reproduce_small.sh"), "-o", str(root), "-r",
                              str(tmp_path / "results.md")], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return [line for line in log.read_text().splitlines() if line.startswith("train") and "--cfg" not in line]

    return root, run


def test_a_rerun_trains_only_what_is_missing(study) -> None:
    root, run = study
    first = run()
    summaries = sorted(p.parent.relative_to(root).as_posix() for p in root.rglob("summary.json"))
    # 2 seeds: size A's 9 configurations (5 of the comparison, hierarchical ESLM, 2 warm starts,
    # ESLM-KD) and size B's 6, CLM at half the steps at both sizes, CoCoNTs; 1 seed: the keep sweep
    # (3 strategies at 1 keep); the teacher and the RHO-1 reference; RHO-1's 5 sweeps at 20 steps
    # (2 seeds) and 4 at 40 (1 seed); size A's comparison, hierarchical ESLM and
    # CoCoNTs at 40 steps (1 seed)
    expected = 2 * (9 + 6 + 2 + 1) + 3 + 2 + 2 * 5 + 4 + (5 + 1 + 1)
    assert len(summaries) == expected, summaries
    assert len(first) == 9 + 6 + 2 + 1 + 3 + 2 + 5 + 4 + 7  # one call per sweep or single run
    assert run() == []  # everything kept
    job = root / "methods" / "a" / "eslm" / "1"
    (job / "summary.json").unlink()
    third = run()
    assert len(third) == 1 and f"hydra.sweep.dir={job.parent}" in third[0]
    assert (job / "summary.json").is_file()
