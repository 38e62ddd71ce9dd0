"""`slm eval ckpt_path=... data=...`: perplexity of a checkpoint on a corpus split."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from slm_cli.commands import CONFIG_PATH, VERSION_BASE
from slm_cli.errors import report_errors


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="eval")
@report_errors
def main(cfg: DictConfig) -> float:
    from slm_cli.evaluate import evaluate

    return evaluate(cfg)["loss"]
