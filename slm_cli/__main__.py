"""`slm`: the command-line entry point.

Each subcommand is a Hydra app over the config tree shipped as ``slm_cli.conf``; this module only
dispatches to it and turns errors into one line (``HYDRA_FULL_ERROR=1`` shows the traceback).
"""

from __future__ import annotations

import importlib
import os
import sys

from slm_cli import completion
from slm_cli.arguments import rewrite

# subcommand -> (module in slm_cli.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("prepare", "tokenize a corpus into train.bin / val.bin / meta.json"),
    "train": ("train", "pretrain a GPT with a token-selection strategy"),
    "eval": ("eval", "perplexity of a checkpoint on a corpus split, or lm-eval tasks (tasks=...)"),
    "score": ("score", "reference-model losses beside a corpus, for selection=rho1"),
    "ngram": ("ngram", "top-r n-gram next-token distributions beside a corpus (n-gram targets)"),
    "export": ("export", "a checkpoint as a Hugging Face transformers folder"),
    "sample": ("sample", "print continuations of a prompt from a checkpoint"),
    "report": ("report", "tables and plots comparing runs and sweeps: report.md/.csv/.html"),
    "tokens": ("tokens", "an HTML page colouring each token of a text by its loss, with the selection marked"),
    "dynamics": ("dynamics", "per-token loss across a run's checkpoints: RHO-1's H→H, L→H, H→L, L→L classes"),
}

USAGE = """usage: slm <command> [hydra overrides...] [-m] [--help] [--cfg job]

commands:
{commands}

examples:
  slm train                                   # gpt2-nano on the embedded stdlib corpus
  slm train +experiment=NAME trainer.max_steps=1000   # or experiment=NAME
  slm train -m optim.lr=3e-4,1e-3 seed=1,2    # a sweep, one run dir per job
  slm prepare data=text data.path=corpus.txt
  slm eval ckpt_path=outputs/train/<run>/checkpoints/last.ckpt data=stdlib
  slm report outputs/train/multirun/<date>    # tables and plots of a sweep (no argument: the latest)

`slm <command> --help` shows the config groups and keys of that command.
eval "$(slm -sc install=bash)" completes commands, groups, keys and values in bash."""


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name.ljust(width)}  {text}" for name, (_, text) in COMMANDS.items()]
    return USAGE.format(commands="\n".join(lines))


def one_line(exc: BaseException) -> str:
    """A Hydra/OmegaConf/slm exception as one line: the problem and, where known, the fix."""
    from hydra.errors import MissingConfigException

    text = str(exc).strip()
    if isinstance(exc, MissingConfigException) and exc.options:
        first = text.splitlines()[0]
        return f"{first}: choose one of {', '.join(sorted(exc.options))}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # Hydra appends the config search path; it is noise for a one-line report.
    lines = [line for line in lines if not line.startswith(("Config search path", "provider=", "Search path"))]
    text = "; ".join(lines) or type(exc).__name__
    if "hydra/launcher/submitit" in text:  # hydra/launcher=slurm without its plugin
        return f"{lines[0].rstrip('.')}: the SLURM launcher needs its plugin: pip install 'slm[slurm]' (make install has it)"
    from slm_cli.errors import SlmError

    if not isinstance(exc, SlmError) and not _is_config_error(exc):
        text = f"{type(exc).__name__}: {text} (set HYDRA_FULL_ERROR=1 for the traceback)"
    return text


def _is_config_error(exc: BaseException) -> bool:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(exc, HydraException | OmegaConfBaseException)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    request = completion.requested(argv)
    if request is not None:  # `slm [command] -sc ...`: the completion script or a query
        try:
            argv = completion.respond(request, list(COMMANDS))
        except ValueError as exc:
            print(f"slm: error: {exc}", file=sys.stderr)
            return 2
        if not argv:
            return 0
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"slm: error: unknown command '{command}': use one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2

    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    # Let every exception reach us instead of Hydra's multi-line report; we print one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    from slm_cli.commands import PROGRAM_ENV
    from slm_cli.errors import JobFailed

    module = importlib.import_module(f"slm_cli.commands.{COMMANDS[command][0]}")
    os.environ[PROGRAM_ENV] = sys.argv[0]  # how this process started, before sys.argv is Hydra's (below)
    try:
        rest = rewrite(command, rest)
    except ValueError as exc:
        print(f"slm {command}: error: {exc}", file=sys.stderr)
        return 2
    sys.argv = [f"slm {command}", *rest]
    try:
        try:
            module.main()
        except JobFailed as failed:  # an error inside the job (see errors.report_errors)
            raise failed.error from None
    except SystemExit as exc:  # Hydra's own exits (--help, bad flags)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        print(f"slm {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if full_error:
            raise
        print(f"slm {command}: error: {one_line(exc)}", file=sys.stderr)
        return 1
    return 0


def entry() -> None:
    """Console-script entry point (`slm`)."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
