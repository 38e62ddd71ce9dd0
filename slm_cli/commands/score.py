"""`slm score data=... ckpt_path=<reference>`: reference-model losses beside a corpus (RHO-1)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from slm_cli.commands import CONFIG_PATH, VERSION_BASE
from slm_cli.errors import report_errors


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="score")
@report_errors
def main(cfg: DictConfig) -> str:
    from slm_cli.reference.scores import run_score

    return run_score(cfg)["folder"]
