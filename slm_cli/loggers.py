"""Names that tie a metrics logger's runs to slm's run dirs (conf/logger/wandb.yaml):

- the run id is a hash of the run dir, so a requeued or continued job (which keeps its run dir)
  continues the same W&B run instead of starting a new one;
- the run name is the task and the job's own overrides (`eslm_tiny selection.alpha=0.4,seed=2`),
  so the jobs of a sweep are told apart (where the run goes, paths and hydra keys, is left out);
- the group is the sweep (task and sweep dir), so its jobs are shown together.

They are OmegaConf resolvers (`${slm_run_id:${paths.output_dir}}`, `${slm_run_name:${task_name}}`,
`${slm_sweep_group:${task_name}}`), registered with the other resolvers when a command starts.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from omegaconf import OmegaConf

# Overrides that say where a run goes, not what it is.
_NOT_NAMING = ("hydra.", "hydra/", "paths.", "ckpt_path", "logger", "trainer.enable_progress_bar")


def run_id(output_dir: str) -> str:
    return hashlib.sha256(str(Path(output_dir).resolve()).encode()).hexdigest()[:16]


def _hydra():  # type: ignore[no-untyped-def]
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def run_name(task: str) -> str:
    hydra = _hydra()
    overrides = [] if hydra is None else [
        o.lstrip("+~") for o in hydra.overrides.task if not o.lstrip("+~").startswith(_NOT_NAMING)]
    return f"{task} {','.join(overrides)}".strip()


def sweep_group(task: str) -> str | None:
    from hydra.types import RunMode

    hydra = _hydra()
    if hydra is None or hydra.mode != RunMode.MULTIRUN:
        return None
    return f"{task}/{Path(hydra.sweep.dir).name}"


def register_resolvers() -> None:
    for name, fn in (("slm_run_id", run_id), ("slm_run_name", run_name), ("slm_sweep_group", sweep_group)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
