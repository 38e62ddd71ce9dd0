"""`slm tokens ckpt_path=... text="..." | file=... | split=val window=K`: one HTML page colouring each
token by its loss, entropy, reference loss or excess loss, with the strategy's selection marked."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from slm_cli.commands import CONFIG_PATH, VERSION_BASE
from slm_cli.errors import report_errors


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="tokens")
@report_errors
def main(cfg: DictConfig) -> str:
    from slm_cli.report.tokens import tokens

    return str(tokens(cfg))
