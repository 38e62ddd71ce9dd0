"""`slm ngram data=... ngram.n=4 ngram.r=8`: top-r n-gram distributions beside a corpus."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from slm_cli.commands import CONFIG_PATH, VERSION_BASE
from slm_cli.errors import report_errors


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="ngram")
@report_errors
def main(cfg: DictConfig) -> str:
    from slm_cli.ngram.build import run_ngram

    return run_ngram(cfg)["folder"]
