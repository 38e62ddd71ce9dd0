"""`slm eval ckpt_path=... tasks=...`: downstream tasks through lm-evaluation-harness (lm-eval).

:func:`evaluate_tasks` runs lm-eval's ``simple_evaluate`` with slm's model (:class:`SlmLM`,
slm_cli/evaluate/lm.py) on slm's local tasks (slm_cli/evaluate/tasks/, no network) or on any task of
the harness (those download their data), writes the harness's results as JSON into the run dir and
prints a table. Importing this module registers the ``"slm"`` model with lm-eval.

lm-eval is an optional extra (``pip install 'slm[eval]'``): without it, importing this module raises
a one-line :class:`SlmError`.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig

from slm_cli.config import is_int, is_number
from slm_cli.errors import SlmError
from slm_cli.evaluate.local_tasks import local_task_names, tasks_dir
from slm_cli.model.load import checkpoint_file
from slm_cli.outputs import load_checkpoint, write_json
from slm_cli.progress import quiet_bars

INSTALL = "pip install 'slm[eval]'"
# 0.4.12 is the first release whose task YAMLs may name an importable `!function` and whose tasks
# carry their YAML's path (`config_source`), which slm's local tasks need to find their data.
MIN_VERSION = (0, 4, 12)

try:
    import lm_eval
    from lm_eval import utils as lm_utils
except ImportError as exc:
    raise SlmError(f"tasks=... needs lm-evaluation-harness, an optional extra ({exc}): {INSTALL}") from None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


if _version(lm_eval.__version__) < MIN_VERSION:
    raise SlmError(f"lm-eval {lm_eval.__version__} is older than slm's task files need "
                   f"({'.'.join(map(str, MIN_VERSION))}): {INSTALL}")

# After the checks above, so a missing lm-eval is the one-line error, not lm.py's ImportError (they run
# here, not in lm.py, so they run again when this module is re-imported with lm.py already loaded).
# Importing lm.py registers the "slm" model with lm-eval.
from slm_cli.evaluate.lm import SlmLM, from_checkpoint  # noqa: E402


def task_list(tasks: Any) -> list[str]:
    """``tasks=a,b`` (a string), ``tasks=[a,b]`` or one name -> the names, in order, without repeats."""
    items = list(tasks) if isinstance(tasks, (list, tuple, ListConfig)) else str(tasks).split(",")
    names = list(dict.fromkeys(str(item).strip() for item in items if str(item).strip()))
    if not names:
        raise SlmError(f"tasks={tasks} names no task: use e.g. tasks=wikitext2_lastword,shakespeare_nextline")
    return names


def _not_custom_dataset_advice(record: logging.LogRecord) -> bool:
    """lm-eval warns on every task with a ``custom_dataset`` that kwargs can be passed: noise here."""
    return "Custom kwargs can be passed" not in record.getMessage()


@contextlib.contextmanager
def _offline(on: bool) -> Iterator[None]:
    """Hugging Face libraries offline while slm's local tasks run: they must not need the network."""
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    if on:
        os.environ.update(dict.fromkeys(saved, "1"))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _git_hash() -> str | None:
    """lm-eval's ``git_hash`` (the commit of the working directory's repo) without git's "fatal: not a
    git repository" on stderr when there is none."""
    import subprocess

    try:
        return subprocess.run(["git", "describe", "--always"], capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


@contextlib.contextmanager
def _quiet_git() -> Iterator[None]:
    import lm_eval.evaluator as evaluator

    if not hasattr(evaluator, "get_git_commit_hash"):  # another lm-eval layout: leave it alone
        yield
        return
    saved = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = _git_hash
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = saved


def _is_yaml(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and Path(name).expanduser().is_file()


def _task_manager(names: list[str]) -> tuple[Any, bool]:
    """lm-eval's TaskManager over slm's tasks (and the harness's own when a name needs them), and
    whether every task is one of slm's own (then nothing may use the network). A path to a task YAML
    is accepted too. Names are checked here so a typo fails in one line, before the model loads."""
    from lm_eval.tasks import TaskManager

    local_names = local_task_names()
    manager = TaskManager(include_path=str(tasks_dir()), include_defaults=False)
    if all(name in manager.all_tasks or _is_yaml(name) for name in names):
        return manager, all(name in manager.all_tasks for name in names)
    manager = TaskManager(include_path=str(tasks_dir()))  # indexes the harness's ~10^4 tasks: seconds
    for name in names:
        if name not in manager.all_tasks and not _is_yaml(name):
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise SlmError(f"unknown task {name!r}{hint}: use one of slm's local tasks ({', '.join(local_names)}, "
                           "or the tag slm_local for all), a task of lm-eval (e.g. hellaswag, arc_easy, "
                           "lambada_openai; `lm_eval ls tasks` lists them) or the path of a task YAML file")
    return manager, False


def results_path(cfg: DictConfig, ckpt: Path, names: list[str]) -> Path:
    """``out=`` if given; else ``<run dir>/eval/<tasks>.json`` for a checkpoint inside a run dir
    (``<tasks>@<checkpoint>.json`` for another checkpoint than last.ckpt)."""
    if cfg.get("out"):
        return Path(str(cfg.out)).expanduser()
    run = ckpt.parent.parent
    if ckpt.parent.name != "checkpoints" or not ((run / ".hydra").is_dir() or (run / "summary.json").is_file()):
        raise SlmError(f"checkpoint {ckpt} is not inside an slm run dir: pass out=<file>.json for the results")
    stem = "+".join(Path(name).stem if _is_yaml(name) else name for name in names)
    suffix = "" if ckpt.name == "last.ckpt" else f"@{ckpt.stem}"
    return run / "eval" / f"{stem}{suffix}.json"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def table(results: dict[str, Any]) -> str:
    """One line per (task, metric): value ± stderr and the number of examples scored."""
    rows = [("task", "metric", "value", "± stderr", "n")]
    for task, entry in results["results"].items():
        n = str(results.get("n-samples", {}).get(task, {}).get("effective", ""))
        first = True
        for key, value in entry.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr"):
                continue
            stderr = entry.get(f"{metric}_stderr,{filt}", "")
            stderr = _fmt(stderr) if isinstance(stderr, float) else ""
            label = metric if filt == "none" else f"{metric} ({filt})"
            rows.append((task if first else "", label, _fmt(value), stderr, n if first else ""))
            first = False
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    aligned = [[cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
               for row in rows]
    return "\n".join("  ".join(row).rstrip() for row in aligned)


def check_settings(cfg: DictConfig) -> None:
    """The harness's keys of conf/eval.yaml, before any work."""
    if not (is_int(cfg.batch_size) and cfg.batch_size > 0):
        raise SlmError(f"batch_size={cfg.batch_size} must be a positive integer: e.g. batch_size=16")
    if cfg.num_fewshot is not None and not (is_int(cfg.num_fewshot) and cfg.num_fewshot >= 0):
        raise SlmError(f"num_fewshot={cfg.num_fewshot} must be a non-negative integer or null: e.g. num_fewshot=5")
    if cfg.limit is not None and not ((is_int(cfg.limit) and cfg.limit > 0)
                                      or (is_number(cfg.limit) and 0 < cfg.limit <= 1)):
        raise SlmError(f"limit={cfg.limit} must be a number of examples, a share in (0, 1] or null: e.g. limit=100")
    if not (is_int(cfg.bootstrap_iters) and cfg.bootstrap_iters >= 0):
        raise SlmError(f"bootstrap_iters={cfg.bootstrap_iters} must be a non-negative integer: e.g. "
                       "bootstrap_iters=1000 (0: no standard errors)")


def evaluate_tasks(cfg: DictConfig) -> dict[str, Any]:
    """Run lm-eval on ``cfg.tasks`` with the checkpoint ``cfg.ckpt_path``; write and print the results."""
    check_settings(cfg)
    names = task_list(cfg.tasks)
    ckpt_file = checkpoint_file(cfg.ckpt_path)
    if not ckpt_file.exists():  # before the task index and the model: the cheap checks first
        raise SlmError(f"checkpoint {ckpt_file} does not exist: pass ckpt_path=<run dir or its checkpoints/last.ckpt>")
    out = results_path(cfg, ckpt_file, names)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its INFO lines would bury the table
    for handler in logging.getLogger().handlers + logging.getLogger("lm_eval").handlers:
        handler.addFilter(_not_custom_dataset_advice)  # a filter is added once, however often this runs
    manager, local = _task_manager(names)
    ckpt = load_checkpoint(ckpt_file)
    # Off a terminal, lm-eval's and `datasets`' bars (a hundred carriage returns per line of a log)
    # are silenced; slm's model writes plain progress lines for the scoring, the part that takes time.
    with _offline(local), _quiet_git(), quiet_bars():
        try:
            loaded = manager.load(names)["tasks"]
        except Exception as exc:
            if local:
                raise
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise SlmError(f"lm-eval could not load {', '.join(names)} ({type(exc).__name__}: {reason}): the "
                           "harness's tasks download their data from the Hugging Face hub, which needs the "
                           f"network (or its cache); slm's local tasks need none: {', '.join(local_task_names())}"
                           ) from exc
        model, tokenizer, eos_token = from_checkpoint(ckpt)
        lm = SlmLM(model=model, tokenizer=tokenizer, eos_token=eos_token, batch_size=cfg.batch_size,
                   device=cfg.get("device"))
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(loaded.values()), task_manager=manager, num_fewshot=cfg.num_fewshot,
            limit=cfg.limit, bootstrap_iters=cfg.bootstrap_iters, log_samples=False)
    results.pop("samples", None)
    record = {"slm": {"checkpoint": str(ckpt_file), "step": ckpt.get("global_step"), "tasks": names,
                      "num_fewshot": cfg.num_fewshot, "limit": cfg.limit, "lm_eval": lm_eval.__version__},
              **results}
    # The harness's results hold a few objects (task functions, numpy numbers): its own converter.
    record = json.loads(json.dumps(record, default=lm_utils.handle_non_serializable))
    write_json(out, record)
    print(table(record))
    print(f"results: {out}")
    return record
