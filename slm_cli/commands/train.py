"""`slm train`: pretrain a GPT with a token-selection strategy (conf/train.yaml)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from slm_cli.commands import CONFIG_PATH, VERSION_BASE
from slm_cli.errors import report_errors


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="train")
@report_errors
def main(cfg: DictConfig) -> float | None:
    from pathlib import Path

    from slm_cli.commands.launch import check_launcher, local_launch
    from slm_cli.errors import SlmError
    from slm_cli.run import discard_unstarted, train

    if cfg.dry_run:
        from slm_cli.run import dry_run

        try:
            dry_run(cfg)
        finally:  # a plan leaves no run dir behind
            discard_unstarted(Path(cfg.paths.output_dir))
        return None
    try:
        check_launcher()
    except SlmError:
        discard_unstarted(Path(cfg.paths.output_dir))
        raise
    with local_launch("train"):
        summary = train(cfg)
    return summary["val_loss"]  # the value a Hydra sweeper optimises
