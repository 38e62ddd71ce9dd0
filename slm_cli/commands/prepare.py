"""`slm prepare`: tokenize a corpus into <paths.data_dir>/<data.name>/."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from slm_cli.commands import CONFIG_PATH, VERSION_BASE
from slm_cli.errors import report_errors


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="prepare")
@report_errors
def main(cfg: DictConfig) -> str:
    from slm_cli.data.prepare import run_prepare

    return str(run_prepare(cfg).dir)
