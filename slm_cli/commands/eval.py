"""`slm eval ckpt_path=... [data=...]`: perplexity of a model on a corpus split (given a run: its own data);
`slm eval ckpt_path=... tasks=a,b`: downstream tasks through lm-evaluation-harness."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from slm_cli.commands import CONFIG_PATH, VERSION_BASE
from slm_cli.errors import report_errors


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="eval")
@report_errors
def main(cfg: DictConfig) -> float:
    if cfg.tasks is not None:
        from slm_cli.evaluate.harness import evaluate_tasks  # raises a one-line SlmError without lm-eval

        evaluate_tasks(cfg)
        return 0.0
    from slm_cli.evaluate.perplexity import evaluate

    return evaluate(cfg)["loss"]
