"""Starting `slm` jobs: the checks and environment that Hydra's launchers and Lightning's local
process launcher need (one process per device, also inside a multirun sweep or a SLURM job), and
how `slm train` starts: the plan alone (dry_run=true), or the run."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig

from slm_cli.errors import SlmError


def check_launcher() -> None:
    """hydra/launcher=slurm without -m would train here, in this process, and submit nothing."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.RUN and "submitit" in str(hydra_cfg.launcher.get("_target_", "")):
        raise SlmError("hydra/launcher=slurm submits the jobs of a sweep, and this is a single run: add -m "
                       "(slm train -m hydra/launcher=slurm ...), also for one job")


# What Lightning's local launcher (one process per device, started by rank 0) puts in rank 0's
# own environment; a later job in the same process would read it as "launched by someone else".
LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextlib.contextmanager
def local_launch(command: str) -> Iterator[None]:
    """Run one `slm` job so that Lightning can start its other ranks, also inside a Hydra multirun.

    Lightning starts ranks 1.. of a local run by re-running the program with ``sys.argv`` and
    ``hydra.run.dir=<HydraConfig run.dir>``. Inside `slm`, and above all inside a multirun sweep,
    that command would be wrong three ways (the known Hydra multirun + DDP problem): ``sys.argv``
    has lost the subcommand, it holds the whole sweep (``-m a=1,2,3``, so every rank would start
    the sweep again), and ``run.dir`` is not the sweep job's dir. Here, for the job's duration,
    ``sys.argv`` is the program, the subcommand and this job's own overrides, and ``run.dir`` is
    the job's output dir. Afterwards the launcher's environment variables are restored and the
    process group is closed, so that the sweep's next job launches its ranks afresh instead of
    waiting forever for ranks that have exited. Processes started by torchrun or srun (LOCAL_RANK
    already set) are left as they are.
    """
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    from slm_cli.commands import PROGRAM_ENV

    program = os.environ.get(PROGRAM_ENV)  # set by slm_cli/__main__.py before the job runs
    ours = "LOCAL_RANK" not in os.environ
    saved_env = {k: os.environ.get(k) for k in LAUNCH_ENV}
    saved_argv = sys.argv[:]
    if ours and program and HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        sys.argv = [program, command, *hydra_cfg.overrides.task]
        with read_write(hydra_cfg), open_dict(hydra_cfg):
            hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = saved_argv
        if ours:
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


def launch_train(cfg: DictConfig) -> float | None:
    """`slm train`: the plan (dry_run=true, leaving no run dir), or the launcher check and the run;
    returns the final validation loss, the value a Hydra sweeper optimises."""
    from slm_cli.run import discard_unstarted, dry_run, train

    run_dir = Path(cfg.paths.output_dir)
    if cfg.dry_run:
        try:
            dry_run(cfg)
        finally:  # a plan leaves no run dir behind
            discard_unstarted(run_dir)
        return None
    try:
        check_launcher()
    except SlmError:
        discard_unstarted(run_dir)
        raise
    with local_launch("train"):
        summary = train(cfg)
    return summary["val_loss"]
