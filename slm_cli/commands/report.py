"""`slm report [RUN_OR_SWEEP_DIR | GLOB ...] [out=DIR]`: tables and plots comparing training runs."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from slm_cli.commands import CONFIG_PATH, VERSION_BASE
from slm_cli.errors import report_errors


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="report")
@report_errors
def main(cfg: DictConfig) -> str:
    from slm_cli.report.build import report

    return str(report(cfg))
