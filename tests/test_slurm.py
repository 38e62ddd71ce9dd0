"""SLURM: `hydra/launcher=slurm`, scripts/submit_slurm.sh and requeue-and-resume, on a real one-node
SLURM that scripts/slurm/local_cluster.sh installs (Debian's slurm-wlm and munge) and starts on this
machine for the module, with its own state dir and ports, and stops afterwards.

The cluster tests are skipped, with the reason, where SLURM cannot be started here (not root, no
apt-get, hydra-submitit-launcher missing, daemons that do not come up); SLM_REQUIRE_SLURM=1 turns
that skip into a failure. Every wait has a time limit and fails with the queue and the job logs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.helpers import QUIET, TINY_DATA, TINY_MODEL, slm
from tests.metrics_rows import assert_same_rows, csv_rows

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "scripts" / "slurm" / "local_cluster.sh"
SUBMIT_SCRIPT = REPO / "scripts" / "submit_slurm.sh"

# Long enough to interrupt a run twice (a tiny step takes ~10 ms), with a checkpoint every 50 steps.
STEPS = 1000
RUN = [f"trainer.max_steps={STEPS}", "trainer.checkpoint_every_n_steps=50"]
TOKENS_PER_STEP = (int(next(o for o in TINY_DATA if o.startswith("data.batch_size=")).split("=")[1])
                   * int(next(o for o in TINY_MODEL if o.startswith("model.block_size=")).split("=")[1]))
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE"}


def tail(path: Path, lines: int = 40) -> str:
    if not path.is_file():
        return f"--- {path}: missing"
    text = path.read_text(errors="replace").splitlines()
    return f"--- {path} (last {min(lines, len(text))} of {len(text)} lines)\n" + "\n".join(text[-lines:])


@dataclass
class Cluster:
    dir: Path
    env: dict[str, str]  # SLURM_CONF for the client commands, sbatch and the jobs

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env={**os.environ, **self.env}, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode:
            pytest.fail(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}\n{self.report()}")
        return proc

    def report(self, *dirs: Path) -> str:
        """The queue, the jobs, the job logs under `dirs` and the daemons' logs: for failure messages."""
        parts = []
        for cmd in (["squeue", "-t", "all"], ["scontrol", "show", "job"]):
            try:
                proc = subprocess.run(cmd, env={**os.environ, **self.env}, capture_output=True, text=True, timeout=20)
                parts.append(f"--- {' '.join(cmd)}\n{proc.stdout[-4000:]}{proc.stderr[-1000:]}")
            except (OSError, subprocess.TimeoutExpired) as exc:
                parts.append(f"--- {' '.join(cmd)}: {exc}")
        for d in dirs:
            for log in sorted([*d.rglob("*_log.out"), *d.rglob("*_log.err"), *d.rglob("job-*.out"), *d.rglob("*.log")]):
                parts.append(tail(log))
        parts += [tail(self.dir / "log" / "slurmctld.log", 15), tail(self.dir / "log" / "slurmd.log", 15)]
        return "\n".join(parts)

    def states(self) -> dict[str, str]:
        """Job id -> state of every job the controller knows (finished ones too: MinJobAge=600)."""
        proc = self.run("squeue", "-h", "-t", "all", "-o", "%i %T", check=False)
        return dict(line.split(maxsplit=1) for line in proc.stdout.splitlines() if line.strip())

    def job_state(self, job_id: str) -> str:
        return self.states().get(job_id, "")

    def cancel_all(self) -> None:
        ids = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if ids:
            self.run("scancel", *ids, check=False)
            deadline = time.monotonic() + 30
            while self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.5)


def wait_for(what: str, done: Callable[[], bool], timeout: float, report: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{report()}")
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def running(pid: int) -> bool:
    """A live process (a zombie, exited but not yet reaped, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cannot_start(reason: str) -> None:
    if os.environ.get("SLM_REQUIRE_SLURM") == "1":
        pytest.fail(f"SLM_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A one-node SLURM on localhost (scripts/slurm/local_cluster.sh install + start), stopped after the module."""
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        cannot_start("hydra-submitit-launcher is not installed (pip install 'slm[slurm]')")
    if os.geteuid() != 0:
        cannot_start("a local SLURM needs root (apt-get install slurm-wlm munge, slurmd)")
    state = tmp_path_factory.mktemp("slurm")
    script_env = {**os.environ, "SLM_SLURM_DIR": str(state), "SLM_SLURM_CTLD_PORT": str(free_port()),
                  "SLM_SLURM_D_PORT": str(free_port())}

    def script(command: str, timeout: float) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(["bash", str(CLUSTER_SCRIPT), command], env=script_env, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            return subprocess.CompletedProcess(exc.cmd, 124, "", f"timed out after {timeout:.0f}s")

    for command, timeout in (("install", 900), ("start", 180)):
        proc = script(command, timeout)
        if proc.returncode:
            script("stop", 120)
            cannot_start(f"cannot start a local SLURM: `local_cluster.sh {command}` failed (exit "
                         f"{proc.returncode}): {(proc.stdout + proc.stderr).strip()[-1500:]}")
    pids = {p.stem: int(p.read_text()) for p in (state / "run").glob("*.pid")}
    assert set(pids) == {"munged", "slurmctld", "slurmd"}, pids
    yield Cluster(dir=state, env={"SLURM_CONF": str(state / "slurm.conf")})
    proc = script("stop", 120)
    assert proc.returncode == 0, f"local_cluster.sh stop: exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
    left = {name: pid for name, pid in pids.items() if running(pid)}
    assert not left, f"still running after `local_cluster.sh stop`: {left}"


@pytest.fixture
def slurm(cluster: Cluster) -> Iterator[Cluster]:
    """The cluster, with no job of this test left behind (a failed test must not hold the node)."""
    yield cluster
    cluster.cancel_all()


def launch(*overrides: str, sweep_dir: Path, data_dir: Path) -> list[str]:
    """`slm train -m hydra/launcher=slurm ...` arguments for a tiny run."""
    return ["train", "-m", "hydra/launcher=slurm", f"hydra.sweep.dir={sweep_dir}", f"paths.data_dir={data_dir}",
            *TINY_DATA, *TINY_MODEL, *QUIET, *overrides]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


class Launch:
    """`slm train -m hydra/launcher=slurm ...` in the background (it returns once its jobs have
    finished), with its output in files. Use as a context manager: it is killed if still running."""

    def __init__(self, cluster: Cluster, *overrides: str, cwd: Path, sweep_dir: Path, data_dir: Path) -> None:
        self.cluster, self.sweep_dir = cluster, sweep_dir
        self.out, self.err = cwd / "launcher.out", cwd / "launcher.err"
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "slm_cli", *launch(*overrides, sweep_dir=sweep_dir, data_dir=data_dir)],
                cwd=cwd, env={**os.environ, **cluster.env}, stdout=out, stderr=err, text=True)

    def __enter__(self) -> Launch:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def report(self) -> str:
        return f"{tail(self.out, 20)}\n{tail(self.err, 30)}\n{self.cluster.report(self.sweep_dir)}"

    def job_ids(self) -> list[str]:
        folder = self.sweep_dir / ".submitit"
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def running(self, what: str) -> Callable[[], bool]:
        """For wait_for: fails at once if `slm` has exited while waiting for `what`."""
        def check() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"`slm train -m` exited ({self.proc.returncode}) while waiting for {what}\n{self.report()}")
            return False
        return check

    def finish(self, timeout: float) -> None:
        """Wait for `slm` to return, and require success. Without accounting (no sacct here)
        submitit cannot see a job that died without writing its result, and would wait forever:
        so this fails soon after every job of the sweep has ended, whatever `slm` is doing."""
        deadline, all_ended_at = time.monotonic() + timeout, None
        while self.proc.poll() is None:
            now = time.monotonic()
            states = self.cluster.states()
            ids = self.job_ids()
            if ids and all(states.get(i) in FINAL_STATES for i in ids):
                all_ended_at = all_ended_at or now
                if now - all_ended_at > 20:
                    pytest.fail(f"the SLURM jobs ended ({', '.join(f'{i}: {states[i]}' for i in ids)}) but "
                                f"`slm train -m` has not returned\n{self.report()}")
            else:
                all_ended_at = None
            if now > deadline:
                pytest.fail(f"`slm train -m` did not return within {timeout:.0f}s\n{self.report()}")
            time.sleep(0.5)
        assert self.proc.returncode == 0, f"`slm train -m`: exit {self.proc.returncode}\n{self.report()}"


def test_launcher_config_follows_the_trainer() -> None:
    """tasks_per_node and nodes come from the trainer config; requeue settings are on; no cluster needed."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher is not installed")
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="slm_cli.conf", version_base="1.3"):
        cfg = compose("train", return_hydra_config=True, overrides=[
            "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
            "hydra.launcher.partition=gpu", "hydra.launcher.account=proj", "hydra.sweep.dir=/sweeps/a"])
        launcher = cfg.hydra.launcher
        assert launcher._target_.endswith("SlurmLauncher")
        assert (launcher.tasks_per_node, launcher.nodes) == (4, 2)
        assert (launcher.partition, launcher.account, launcher.qos) == ("gpu", "proj", None)
        assert launcher.submitit_folder == "/sweeps/a/.submitit/%j"
        assert launcher.additional_parameters == {"requeue": True}
        assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0
        for key in ("timeout_min", "gpus_per_node", "cpus_per_task", "mem_gb"):
            assert key in launcher


@pytest.fixture(scope="module")
def sweep(cluster: Cluster, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-job sweep (seed=1,2) through hydra/launcher=slurm; `slm` returns when both jobs have finished."""
    base = tmp_path_factory.mktemp("sweep")
    sweep_dir = base / "sweep"
    with Launch(cluster, *RUN, "seed=1,2", cwd=base, sweep_dir=sweep_dir, data_dir=tiny_data) as run:
        try:
            run.finish(timeout=300)
        finally:
            cluster.cancel_all()
    return sweep_dir


@pytest.mark.slow
def test_sweep_runs_one_slurm_job_per_point(sweep: Path) -> None:
    summaries = [summary(sweep / str(i)) for i in (0, 1)]
    for s in summaries:
        assert s["steps"] == STEPS
        assert s["train_tokens"] == STEPS * TOKENS_PER_STEP
    assert summaries[0]["val_loss"] != summaries[1]["val_loss"]  # seed=1 and seed=2
    # each job ran as a SLURM job (array task), from submitit's sbatch script
    scripts = list((sweep / ".submitit").glob("*/*_submission.sh"))
    assert len(scripts) == 1, scripts
    text = scripts[0].read_text()
    for flag in ("--array=0-1", "--nodes=1", "--ntasks-per-node=1", "--requeue", "--signal=USR2@120"):
        assert flag in text, f"{flag} not in {scripts[0]}:\n{text}"
    logs = sorted((sweep / ".submitit").glob("*_*/*_0_log.out"))
    assert len(logs) == 2 and all("Job completed successfully" in log.read_text() for log in logs), logs


@pytest.mark.slow
def test_bad_partition_is_one_readable_line(slurm: Cluster, tiny_data: Path, tmp_path: Path) -> None:
    proc = slm(*launch("hydra.launcher.partition=nosuchpartition", sweep_dir=tmp_path / "sweep", data_dir=tiny_data),
               cwd=tmp_path, env=slurm.env, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("slm train: error:") and "invalid partition" in last.lower(), proc.stderr[-2000:]


@pytest.mark.slow
def test_error_inside_a_job_is_one_line_in_slm(slurm: Cluster, tiny_data: Path, tmp_path: Path) -> None:
    """A job that fails (here a bad value, checked in the job) ends `slm train -m` with that job's
    one-line error and a non-zero exit, instead of leaving it waiting for a result."""
    proc = slm(*launch("optim.lr=-1", sweep_dir=tmp_path / "sweep", data_dir=tiny_data), cwd=tmp_path,
               env=slurm.env, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "slm train: error: optim.lr=-1 must be > 0: pass e.g. optim.lr=6e-4"
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_ddp_job_gets_one_srun_task_per_device(slurm: Cluster, tiny_data: Path, tmp_path: Path) -> None:
    """trainer.devices=2 becomes --ntasks-per-node=2: Lightning runs one rank per SLURM task."""
    sweep_dir = tmp_path / "sweep"
    overrides = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=2",
                 "trainer.max_steps=20"]
    with Launch(slurm, *overrides, cwd=tmp_path, sweep_dir=sweep_dir, data_dir=tiny_data) as run:
        run.finish(timeout=240)
    assert "--ntasks-per-node=2" in next((sweep_dir / ".submitit").glob("*/*_submission.sh")).read_text()
    logs = "\n".join(p.read_text() for p in (sweep_dir / ".submitit").glob("*/*_log.out"))
    assert "global_rank=0(2)" in logs and "global_rank=1(2)" in logs, run.report()
    s = summary(sweep_dir / "0")
    assert s["steps"] == 20 and s["train_tokens"] == 20 * TOKENS_PER_STEP * 2


def step_files(run_dir: Path) -> set[int]:
    return {int(m.group(1)) for p in (run_dir / "checkpoints").glob("step*.ckpt")
            if (m := re.fullmatch(r"step(\d+)\.ckpt", p.name))}


@pytest.mark.slow
def test_requeued_job_resumes_from_last_ckpt(slurm: Cluster, sweep: Path, tiny_data: Path, tmp_path: Path) -> None:
    """Interrupt one launcher job twice: `scontrol requeue` (by hand), then USR2 (what SLURM sends
    before the time limit, so submitit, the requeue owner, checkpoints and requeues the job). Each
    restart resumes from last.ckpt; the result is exactly that of the uninterrupted job with the
    same seed in the sweep: nothing lost, nothing counted twice."""
    sweep_dir, run_dir = tmp_path / "sweep", tmp_path / "sweep" / "0"

    def restored() -> int:
        log = run_dir / "train.log"
        return log.read_text().count("Restored all states from the checkpoint") if log.exists() else 0

    with Launch(slurm, *RUN, "seed=1", cwd=tmp_path, sweep_dir=sweep_dir, data_dir=tiny_data) as run:
        wait_for("the job's first checkpoint", lambda: (run_dir / "checkpoints" / "last.ckpt").exists()
                 or run.running("the first checkpoint")(), 180, run.report)
        (job_id,) = run.job_ids()
        assert not (run_dir / "summary.json").exists(), "the run finished before it could be requeued: raise STEPS"
        slurm.run("scontrol", "requeue", job_id)

        # the requeued job restarts, resumes and writes a checkpoint of its own
        wait_for("the requeued job to resume", lambda: restored() >= 1 or run.running("the resume")(), 180,
                 run.report)
        before = max(step_files(run_dir))
        wait_for("a checkpoint after the resume", lambda: max(step_files(run_dir)) > before
                 or run.running("a new checkpoint")(), 120, run.report)
        assert not (run_dir / "summary.json").exists(), "the run finished before the second interruption: raise STEPS"
        slurm.run("scancel", "--signal=USR2", job_id)
        run.finish(timeout=240)
    report = run.report

    job_log = "\n".join(p.read_text() for p in (sweep_dir / ".submitit").glob("*/*_0_log.*"))
    assert job_log.count("Starting with JobEnvironment") == 3, report()  # the first run and two restarts
    assert "Caught signal SIGUSR2" in job_log and f"Requeued job {job_id}" in job_log, report()
    train_log = (run_dir / "train.log").read_text()
    assert len(re.findall(r"resuming from \S*/checkpoints/last\.ckpt", train_log)) == 2, report()
    assert restored() == 2, report()

    s, uninterrupted = summary(run_dir), summary(sweep / "0")  # the sweep's seed=1 job, never interrupted
    assert s["steps"] == STEPS
    assert s["train_tokens"] == STEPS * TOKENS_PER_STEP
    assert s["selected_tokens"] == uninterrupted["selected_tokens"]
    assert s["val_loss"] == pytest.approx(uninterrupted["val_loss"], abs=1e-6)


def submit_script(slurm: Cluster, tmp_path: Path, tiny_data: Path, *overrides: str) -> tuple[str, Path]:
    """scripts/submit_slurm.sh submitted on one node with one CPU task; (job id, run dir)."""
    slm_bin = shutil.which("slm", path=str(Path(sys.executable).parent))
    if slm_bin is None:
        pytest.skip(f"no `slm` console script beside {sys.executable}")
    run_dir = tmp_path / "run"
    env = {**slurm.env, "SLM_TRAINER": "cpu", "SLM_RUN_DIR": str(run_dir), "SLM": slm_bin}
    proc = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={tmp_path}", f"--output={tmp_path}/job-%j.out", "--nodes=1",
         "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=1G", "--time=10",
         str(SUBMIT_SCRIPT), f"paths.data_dir={tiny_data}", *TINY_DATA, *TINY_MODEL, *QUIET, *overrides],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"sbatch: {proc.stdout}{proc.stderr}"
    return proc.stdout.strip().split(";")[0], run_dir


@pytest.mark.slow
def test_plain_sbatch_script_requeues_itself_and_resumes(slurm: Cluster, sweep: Path, tiny_data: Path,
                                                          tmp_path: Path) -> None:
    """scripts/submit_slurm.sh on one node, one CPU task: USR1 (its time-limit warning) makes the
    batch script requeue its own job, which resumes from last.ckpt under the same run dir."""
    job_id, run_dir = submit_script(slurm, tmp_path, tiny_data, *RUN, "seed=1")

    def report() -> str:
        return slurm.report(tmp_path)

    wait_for("the job's first checkpoint", lambda: (run_dir / "checkpoints" / "last.ckpt").exists()
             or slurm.job_state(job_id) in FINAL_STATES, 180, report)
    assert not (run_dir / "summary.json").exists(), "the run finished before it could be requeued: raise STEPS"
    slurm.run("scancel", "--batch", "--signal=USR1", job_id)
    wait_for(f"job {job_id} to finish", lambda: slurm.job_state(job_id) in FINAL_STATES, 240, report)
    assert slurm.job_state(job_id) == "COMPLETED", report()

    log = (tmp_path / f"job-{job_id}.out").read_text()
    assert f"requeueing job {job_id}" in log and "(restart 1)" in log, report()
    assert re.search(r"resuming from \S*/checkpoints/last\.ckpt", log), report()
    s, uninterrupted = summary(run_dir), summary(sweep / "0")
    assert s["steps"] == STEPS
    assert s["train_tokens"] == STEPS * TOKENS_PER_STEP
    assert s["val_loss"] == pytest.approx(uninterrupted["val_loss"], abs=1e-6)


# Preemption (slm_cli/preemption.py): no periodic checkpoint to fall back on, so a resumed run can
# only have resumed from the checkpoint saved at the signal; rows on disk at once, to see progress.
PREEMPT = [f"trainer.max_steps={STEPS}", "trainer.checkpoint_every_n_steps=100000",
           "+logger.csv.flush_logs_every_n_steps=1", "seed=1"]
SAVED = re.compile(r"received (SIG\w+): saved \S*/checkpoints/last\.ckpt at step (\d+)")


def logged_steps(run_dir: Path) -> list[int]:
    return [s for s, k, _ in csv_rows(run_dir)[0] if k == "train/loss"] if (run_dir / "metrics.csv").is_file() else []


def saves(log: Path) -> list[tuple[str, int]]:
    """(signal, step) of each preemption save the run's log reports."""
    return [(m[0], int(m[1])) for m in SAVED.findall(log.read_text())] if log.is_file() else []


def assert_same_run(run_dir: Path, uninterrupted: Path) -> None:
    """Weights and metrics rows of an interrupted run equal those of the uninterrupted one."""
    s, u = summary(run_dir), summary(uninterrupted)
    assert s["steps"] == STEPS and s["train_tokens"] == STEPS * TOKENS_PER_STEP
    assert s["selected_tokens"] == u["selected_tokens"]
    assert s["val_loss"] == pytest.approx(u["val_loss"], abs=1e-6)
    a = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(uninterrupted / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for k, v in b.items():
        torch.testing.assert_close(a[k], v, rtol=0, atol=1e-6)
    (rows, throughput), (want, want_throughput) = csv_rows(run_dir), csv_rows(uninterrupted)
    assert_same_rows(rows, want)
    assert throughput == want_throughput


@pytest.mark.slow
def test_preempted_launcher_job_resumes_from_the_step_it_reached(slurm: Cluster, sweep: Path, tiny_data: Path,
                                                                 tmp_path: Path) -> None:
    """A launcher job interrupted by `scontrol requeue` (SIGTERM) and then by USR2 (the time-limit
    warning, which submitit acts on) saves last.ckpt at the step it is at each time, and each
    restart resumes from that step; the run ends as the sweep's uninterrupted seed=1 job."""
    sweep_dir, run_dir = tmp_path / "sweep", tmp_path / "sweep" / "0"
    log = run_dir / "train.log"
    with Launch(slurm, *PREEMPT, cwd=tmp_path, sweep_dir=sweep_dir, data_dir=tiny_data) as run:
        reached = []
        for n, (how, name) in enumerate([(["scontrol", "requeue"], "SIGTERM"), (["scancel", "--signal=USR2"], "SIGUSR2")]):
            before = max(logged_steps(run_dir), default=-1)
            wait_for("the job to train", lambda b=before: max(logged_steps(run_dir), default=-1) >= b + 20
                     or run.running("training")(), 180, run.report)
            (job_id,) = run.job_ids()
            assert not (run_dir / "summary.json").exists(), "the run finished before it was interrupted: raise STEPS"
            seen = max(logged_steps(run_dir))
            slurm.run(*how, job_id)
            wait_for(f"the save on {name}", lambda k=n: len(saves(log)) > k or run.running("the save")(), 120,
                     run.report)
            signal_name, step = saves(log)[n]
            assert signal_name == name
            assert step > seen  # the step it was at, not an earlier one (and no periodic checkpoint exists)
            assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == step
            reached.append(step)
            wait_for("the requeued job to resume", lambda k=n: log.read_text().count(
                "Restored all states from the checkpoint") > k or run.running("the resume")(), 180, run.report)
        run.finish(timeout=300)

    job_log = "\n".join(p.read_text() for p in (sweep_dir / ".submitit").glob("*/*_0_log.*"))
    assert job_log.count("Starting with JobEnvironment") == 3, run.report()  # the first run and two restarts
    assert "Caught signal SIGUSR2" in job_log and f"Requeued job {job_id}" in job_log, run.report()
    assert reached[0] < reached[1] < STEPS
    assert not list((run_dir / "checkpoints").glob("step*.ckpt"))
    assert_same_run(run_dir, sweep / "0")


@pytest.mark.slow
def test_preempted_script_job_resumes_from_the_step_it_reached(slurm: Cluster, sweep: Path, tiny_data: Path,
                                                               tmp_path: Path) -> None:
    """scripts/submit_slurm.sh: USR1 to the batch shell (its time-limit warning) is passed on to
    `slm train`, which saves the step it is at and exits; the script then requeues the job, which
    resumes from that step and ends as the sweep's uninterrupted seed=1 job."""
    job_id, run_dir = submit_script(slurm, tmp_path, tiny_data, *PREEMPT)

    def report() -> str:
        return slurm.report(tmp_path)

    wait_for("the job to train", lambda: len(logged_steps(run_dir)) >= 3
             or slurm.job_state(job_id) in FINAL_STATES, 180, report)
    assert not (run_dir / "summary.json").exists(), "the run finished before it could be interrupted: raise STEPS"
    seen = max(logged_steps(run_dir))
    slurm.run("scancel", "--batch", "--signal=USR1", job_id)
    wait_for(f"job {job_id} to finish", lambda: slurm.job_state(job_id) in FINAL_STATES, 300, report)
    assert slurm.job_state(job_id) == "COMPLETED", report()

    log = (tmp_path / f"job-{job_id}.out").read_text()
    assert f"requeueing job {job_id} (slm exited with {128 + 10})" in log and "(restart 1)" in log, report()
    ((signal_name, step),) = saves(run_dir / "train.log")
    assert signal_name == "SIGUSR1" and seen < step < STEPS, report()
    assert re.search(r"resuming from \S*/checkpoints/last\.ckpt", log), report()
    assert not list((run_dir / "checkpoints").glob("step*.ckpt"))
    assert_same_run(run_dir, sweep / "0")
