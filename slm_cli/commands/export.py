"""`slm export ckpt_path=... out=...`: a checkpoint as a Hugging Face transformers folder."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from slm_cli.commands import CONFIG_PATH, VERSION_BASE
from slm_cli.errors import report_errors


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="export")
@report_errors
def main(cfg: DictConfig) -> str:
    from slm_cli.model.export import export

    out = export(str(cfg.ckpt_path), str(cfg.out))
    print(f"exported {cfg.ckpt_path} to {out}")
    return str(out)
