"""`slm train`: pretrain a GPT with a token-selection strategy (conf/train.yaml)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from slm_cli.commands import CONFIG_PATH, VERSION_BASE
from slm_cli.errors import report_errors


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="train")
@report_errors
def main(cfg: DictConfig) -> float | None:
    from slm_cli.commands.launch import launch_train

    return launch_train(cfg)
