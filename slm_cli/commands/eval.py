"""`slm eval ckpt_path=... data=...`: perplexity of a checkpoint on a corpus split;
`slm eval ckpt_path=... tasks=a,b`: downstream tasks through lm-evaluation-harness."""

from __future__ import annotations

import re
import sys

import hydra
from omegaconf import DictConfig

from slm_cli.commands import CONFIG_PATH, VERSION_BASE
from slm_cli.errors import report_errors

# `tasks=a,b` is a Hydra sweep, refused without -m; outside a sweep it means the list [a,b].
_COMMA_TASKS = re.compile(r"^tasks=([^\[\]'\"=]+,[^\[\]'\"=]*)$")


def _tasks_as_list(argv: list[str]) -> list[str]:
    if "-m" in argv or "--multirun" in argv:
        return argv
    return [f"tasks=[{m.group(1)}]" if (m := _COMMA_TASKS.match(arg)) else arg for arg in argv]


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="eval")
@report_errors
def _main(cfg: DictConfig) -> float:
    if cfg.tasks is not None:
        from slm_cli.evaluate.harness import evaluate_tasks  # raises a one-line SlmError without lm-eval

        evaluate_tasks(cfg)
        return 0.0
    from slm_cli.evaluate.perplexity import evaluate

    return evaluate(cfg)["loss"]


def main() -> None:
    sys.argv = _tasks_as_list(sys.argv)
    _main()
