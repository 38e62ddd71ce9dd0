"""Preemption without SLURM: a `slm train` process that gets SIGTERM (or USR1, SLURM's time-limit
warning in scripts/submit_slurm.sh) mid-run saves last.ckpt at the end of the step in progress,
writes no summary.json, exits with 128 + the signal's number, and a re-run in the same run dir
resumes from that step and ends as a run that was never interrupted: same weights, same metrics
rows. On SLURM itself: tests/test_slurm.py.

The signalled runs are given far more steps than they get to do (max_steps=100000), so that they
are still training when the signal comes however fast the machine is; optim.decay_steps is fixed,
so that the re-run may stop earlier (at the step reached + 3) on the same trajectory.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import QUIET, TINY_DATA, TINY_MODEL, train
from tests.metrics_rows import assert_same_rows, csv_rows

COMMON = ["trainer.log_every_n_steps=1", "trainer.val_check_interval=2", "optim.decay_steps=100",
          "optim.warmup_steps=2", "trainer.checkpoint_every_n_steps=100000",  # no periodic checkpoint to fall back on
          "+logger.csv.flush_logs_every_n_steps=1"]  # rows on disk at once: the test watches them
TOKENS_PER_STEP = 4 * 32  # data.batch_size x model.block_size (tests/helpers.py)


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [int(float(r["step"])) for r in csv.DictReader(f) if r.get("train/loss")]


class Run:
    """`slm train` in the background, its output in files."""

    def __init__(self, run_dir: Path, data_dir: Path, *overrides: str, cwd: Path) -> None:
        self.run_dir, self.out = run_dir, cwd / f"{run_dir.name}.out"
        with self.out.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "slm_cli", "train", f"hydra.run.dir={run_dir}", f"paths.data_dir={data_dir}",
                 *TINY_DATA, *TINY_MODEL, *QUIET, *COMMON, "trainer.max_steps=100000", *overrides],
                cwd=cwd, stdout=out, stderr=subprocess.STDOUT, text=True)

    def output(self) -> str:
        return self.out.read_text()[-5000:]

    def wait_for_steps(self, n: int, timeout: float = 600) -> int:
        """Wait until n steps are logged; returns how many are."""
        deadline = time.monotonic() + timeout
        while len(steps := logged_steps(self.run_dir)) < n:
            if self.proc.poll() is not None:
                pytest.fail(f"`slm train` exited ({self.proc.returncode}) before logging {n} steps:\n{self.output()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"no {n} steps logged within {timeout:.0f}s:\n{self.output()}")
            time.sleep(0.05)
        return len(steps)

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"`slm train` did not exit within {timeout:.0f}s of the signal:\n{self.output()}")


def check_stopped_at_a_step(run: Run, seen: int, signum: int) -> int:
    """The signalled run exited for the requeue, with last.ckpt holding the last step it trained;
    returns that step count."""
    assert run.wait() == 128 + signum, run.output()
    assert not (run.run_dir / "summary.json").exists()
    assert f"received {signal.Signals(signum).name}: saved" in run.output()
    reached = torch.load(run.run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    # Every step trained was logged once, and the checkpoint holds the last of them: nothing
    # trained after the checkpoint, nothing lost. The signal came after `seen` logged steps.
    assert logged_steps(run.run_dir) == list(range(reached))
    assert reached >= seen
    assert not list((run.run_dir / "checkpoints").glob("step*.ckpt"))  # it is the only checkpoint
    return reached


def test_sigterm_saves_the_step_reached_and_the_rerun_ends_as_uninterrupted(tiny_data: Path, tmp_path: Path) -> None:
    run = Run(tmp_path / "run", tiny_data, cwd=tmp_path)
    seen = run.wait_for_steps(3)
    run.proc.send_signal(signal.SIGTERM)
    reached = check_stopped_at_a_step(run, seen, signal.SIGTERM)

    end = [*COMMON, f"trainer.max_steps={reached + 3}"]
    resumed = train(run.run_dir, tiny_data, *end, cwd=tmp_path)  # the same run dir: automatic resume
    assert f"resuming from {run.run_dir}/checkpoints/last.ckpt" in (run.run_dir / "train.log").read_text()
    whole = train(tmp_path / "whole", tiny_data, *end, cwd=tmp_path)
    for key in ("steps", "train_tokens", "selected_tokens", "flops_nominal", "flops_realized"):
        assert resumed[key] == whole[key], key
    assert resumed["steps"] == reached + 3
    assert resumed["val_loss"] == pytest.approx(whole["val_loss"], abs=1e-6)
    a = torch.load(run.run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for k, v in b.items():
        torch.testing.assert_close(a[k], v, rtol=0, atol=1e-6)
    (rows, throughput), (want, want_throughput) = csv_rows(run.run_dir), csv_rows(tmp_path / "whole")
    assert_same_rows(rows, want)
    assert throughput == want_throughput


def alive(pid: int) -> bool:
    """A live process (a zombie, exited but not yet reaped, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tiny_data: Path, tmp_path: Path) -> None:
    """DDP with 2 CPU processes: USR1 reaches rank 1 only. The ranks agree at the next step
    boundary, both stop there (rank 0 saves), and the re-run completes the run from that step with
    nothing lost or counted twice."""
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=2"]
    run = Run(tmp_path / "run", tiny_data, *ddp, cwd=tmp_path)
    seen = run.wait_for_steps(3)
    (rank1,) = children(run.proc.pid)
    assert "LOCAL_RANK=1" in Path(f"/proc/{rank1}/environ").read_text().replace("\0", "\n").splitlines()
    os.kill(rank1, signal.SIGUSR1)  # rank 1 alone gets the signal
    reached = check_stopped_at_a_step(run, seen, signal.SIGUSR1)  # rank 0's exit: it stopped too
    deadline = time.monotonic() + 60
    while alive(rank1):  # and rank 1 has ended as well
        assert time.monotonic() < deadline, f"rank 1 (pid {rank1}) still running after rank 0 exited"
        time.sleep(0.1)

    summary = train(run.run_dir, tiny_data, *COMMON, *ddp, f"trainer.max_steps={reached + 2}", cwd=tmp_path)
    assert summary["steps"] == reached + 2
    assert summary["train_tokens"] == (reached + 2) * TOKENS_PER_STEP * 2  # every step once, on 2 ranks
    assert logged_steps(run.run_dir) == list(range(reached + 2))
