"""`slm sample ckpt_path=... prompt="..."`: print continuations of a prompt."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from slm_cli.commands import CONFIG_PATH, VERSION_BASE
from slm_cli.errors import report_errors


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="sample")
@report_errors
def main(cfg: DictConfig) -> list[str]:
    from slm_cli.evaluate.sample import print_samples

    return print_samples(cfg)
