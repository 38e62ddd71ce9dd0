"""`slm dynamics run=<run dir>`: per-token loss across a run's checkpoints, classified H→H, L→H,
H→L, L→L as in RHO-1 (arXiv 2404.07965)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from slm_cli.commands import CONFIG_PATH, VERSION_BASE
from slm_cli.errors import report_errors


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="dynamics")
@report_errors
def main(cfg: DictConfig) -> str:
    from slm_cli.report.dynamics import dynamics

    return str(dynamics(cfg))
