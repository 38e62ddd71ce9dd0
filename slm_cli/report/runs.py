"""Reading training run dirs for `slm report`: which runs a path names, and what each one holds.

A run dir is any folder with ``.hydra/config.yaml`` (what `slm train` writes first). Its
``summary.json`` is written last and atomically, so a run without one did not finish: it is still
running, was stopped, or failed. A Hydra sweep dir (``slm train -m``) holds one run dir per job
(``0/``, ``1/``, ...) and ``multirun.yaml``; a SLURM sweep (hydra-submitit-launcher) has the same
layout plus ``.submitit/``, where each job's log tells whether it ended and how.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from slm_cli.errors import SlmError
from slm_cli.summary import FILE as SUMMARY
from slm_cli.summary import RunSummary
from slm_cli.summary import read as read_summary

CONFIG = Path(".hydra") / "config.yaml"
# Where the CSV logger has put metrics.csv: the run dir itself (conf/logger/csv.yaml), a csv/
# folder (earlier versions), Lightning's own default layout (<name>/version_<n>/).
METRICS = ("metrics.csv", "csv/metrics.csv", "*/metrics.csv", "*/*/metrics.csv")

FINISHED, UNFINISHED, FAILED = "finished", "unfinished", "failed"
PROGRESS_COLUMNS = ("train/loss", "train/loss_all", "flops/nominal", "val/loss")


@dataclass
class Run:
    """One run dir: its config, its summary (None until the run finished) and its status."""

    dir: Path
    config: dict[str, Any]
    summary: RunSummary | None
    status: str
    note: str = ""                      # why a run is not finished, in a few words
    sweep: Path | None = None           # the sweep dir holding it, if any
    metrics_path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    @cached_property
    def metrics(self) -> dict[str, tuple[list[int], list[float]]]:
        """metrics.csv as column -> (steps, values), without the empty cells of other rows."""
        return read_metrics_csv(self.metrics_path) if self.metrics_path else {}

    @cached_property
    def figures(self) -> dict[str, float]:
        """The summary's numbers by key (see :func:`summary_figures`) and the downstream accuracy
        of the final model per task (``acc:<task>``, see :func:`read_downstream`)."""
        if not self.summary:
            return {}
        return {**summary_figures(self.summary),
                **{f"{prefix}{task}": value for task, pair in read_downstream(self.dir).items()
                   for prefix, value in zip((ACCURACY, ACCURACY_SE), pair, strict=True)}}

    @property
    def tokens_per_step(self) -> float | None:
        """Training tokens per optimizer step: from the counters when the run finished, else from
        the config (batch × context × accumulation × devices × nodes, when all are numbers)."""
        f = self.figures
        if f.get("steps") and f.get("train_tokens"):
            return f["train_tokens"] / f["steps"]
        product = 1.0
        for key in ("data.batch_size", "model.block_size", "trainer.accumulate_grad_batches",
                    "trainer.devices", "trainer.num_nodes"):
            value = flat_get(self.config, key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                return None  # e.g. trainer.devices=auto: not known from the config alone
            product *= value
        return product

    def last_step(self) -> int | None:
        """Optimizer steps logged so far (metrics.csv's step column is 0-based). Only the training
        and validation columns count: the throughput monitor's validate/* rows use another counter."""
        steps = [s[-1] for key, (s, _) in self.metrics.items() if s and key in PROGRESS_COLUMNS]
        return max(steps) + 1 if steps else None


SOURCE_LOSS = "val_loss:"  # figure name prefix of a mixture source's validation loss
ACCURACY = "acc:"         # figure name prefix of a downstream task's accuracy
ACCURACY_SE = "acc_se:"   # ... and of its standard error over the task's examples (lm-eval's acc_stderr)
EVAL = "eval"             # where `slm eval tasks=` writes a run's results (slm_cli/evaluate/harness.py)
SECONDS = "train/time"    # Lightning's ThroughputMonitor: seconds inside training, validation excluded


def summary_figures(summary: RunSummary) -> dict[str, float]:
    """The numbers of a summary (slm_cli/summary.py reads older key names): its figures, a
    mixture's validation loss per source (``val_loss:<source>``) and the selected fraction."""
    out = summary.numbers()
    # a mixture's validation loss per source (docs/data.md)
    out.update({f"{SOURCE_LOSS}{name}": value for name, value in (summary.val_sources or {}).items()})
    if summary.train_tokens and summary.selected_tokens is not None:
        out["selected_frac"] = summary.selected_tokens / summary.train_tokens
    if summary.train_tokens and summary.forward_tokens is not None:
        out["forward_frac"] = summary.forward_tokens / summary.train_tokens
    return out


def read_downstream(run_dir: Path) -> dict[str, tuple[float, float]]:
    """The accuracy (lm-eval's ``acc`` metric, filter ``none``) per task of a run's final model, with
    its standard error over the task's examples (``acc_stderr``; 0 where lm-eval gives none):
    from the results `slm eval ckpt_path=<run> tasks=...` writes to ``<run>/eval/<tasks>.json``.
    Results of another checkpoint (``<tasks>@<checkpoint>.json``) are not the run's final model
    and are left out; a task in several files takes the newest file's value; a file that is not
    lm-eval's results, and a task without ``acc``, give nothing."""
    folder = run_dir / EVAL
    if not folder.is_dir():
        return {}
    found: dict[str, tuple[float, float]] = {}
    files = sorted((p for p in folder.glob("*.json") if "@" not in p.name), key=lambda p: (p.stat().st_mtime, p.name))
    for path in files:
        try:
            results = json.loads(path.read_text()).get("results")
        except (OSError, ValueError, AttributeError):
            continue
        for task, entry in (results.items() if isinstance(results, dict) else ()):
            value = entry.get("acc,none") if isinstance(entry, dict) else None
            if _finite(value):
                se = entry.get("acc_stderr,none")
                found[str(task)] = (float(value), float(se) if _finite(se) else 0.0)
    return found


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def flat_get(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"a.b.c": leaf}; lists stay whole (one value)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def read_metrics_csv(path: Path) -> dict[str, tuple[list[int], list[float]]]:
    """A Lightning metrics.csv as column -> (steps, values). Each logging call writes its own row
    and leaves the other columns empty, so every column keeps only its own (step, value) pairs."""
    columns: dict[str, tuple[list[int], list[float]]] = {}
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    step = int(float(row.get("step") or "nan"))
                except ValueError:
                    continue  # no step (a half-written last line of a running job)
                for key, text in row.items():
                    if key in ("step", "epoch") or not key or not text:
                        continue
                    try:
                        value = float(text)
                    except ValueError:
                        continue
                    steps, values = columns.setdefault(key, ([], []))
                    steps.append(step)
                    values.append(value)
    except OSError:
        return {}
    return columns


def _metrics_path(run_dir: Path) -> Path | None:
    for pattern in METRICS:
        found = sorted(run_dir.glob(pattern))
        if found:
            return found[0]
    return None


def is_run_dir(path: Path) -> bool:
    return (path / CONFIG).is_file()


def sweep_of(run_dir: Path) -> Path | None:
    """The sweep dir a run belongs to: its parent, when Hydra's sweeper or submitit wrote there."""
    parent = run_dir.parent
    if (parent / "multirun.yaml").is_file() or (parent / ".submitit").is_dir():
        return parent
    return None


def read_run(run_dir: Path) -> Run:
    """A run dir's config, summary and status; never raises for a run that is running or broke."""
    run_dir = run_dir.resolve()
    try:
        config = yaml.safe_load((run_dir / CONFIG).read_text()) or {}
        if not isinstance(config, dict):
            raise ValueError("not a mapping")
    except (OSError, ValueError, yaml.YAMLError) as exc:
        config = {}
        broken = f"unreadable {CONFIG} ({str(exc).splitlines()[0][:80]})"
    else:
        broken = ""
    run = Run(dir=run_dir, config=config, summary=None, status=UNFINISHED, sweep=sweep_of(run_dir),
              metrics_path=_metrics_path(run_dir))
    summary_path = run_dir / SUMMARY
    if summary_path.is_file():
        try:
            summary = read_summary(summary_path)
        except (OSError, ValueError) as exc:
            run.status, run.note = FAILED, f"unreadable {SUMMARY} ({str(exc).splitlines()[0][:80]})"
            return run
        run.summary, run.status = summary, FINISHED
        if broken:
            run.note = broken
        return run
    run.note = broken or _unfinished_note(run)
    failure = _slurm_failure(run)
    if failure is not None:
        run.status, run.note = FAILED, failure
    return run


def _unfinished_note(run: Run) -> str:
    step, max_steps = run.last_step(), flat_get(run.config, "trainer.max_steps")
    progress = (f"logged step {step}" + (f" of {max_steps}" if isinstance(max_steps, int) else "")
                if step is not None else "nothing logged")
    return f"no {SUMMARY}: running, stopped or failed; {progress}"


def _slurm_failure(run: Run) -> str | None:
    """For a job of a SLURM sweep: a note if submitit says the job ended without a summary.

    hydra-submitit-launcher records the SLURM job id as hydra.job.id in the run's hydra.yaml, and
    submitit writes ``<sweep>/.submitit/<id>/<id>_<task>_result.pkl`` when a job ends, with the
    traceback in ``<id>_0_log.err``. The pickle is not loaded (it can hold arbitrary objects).
    """
    if run.sweep is None or not (run.sweep / ".submitit").is_dir():
        return None
    try:
        hydra_cfg = yaml.safe_load((run.dir / ".hydra" / "hydra.yaml").read_text()) or {}
        job_id = str(hydra_cfg["hydra"]["job"]["id"])
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None
    folder = run.sweep / ".submitit" / job_id
    if not re.fullmatch(r"[\w.-]+", job_id) or not list(folder.glob(f"{job_id}_*_result.pkl")):
        return None  # still queued or running (or not a submitit job)
    last = ""
    err = folder / f"{job_id}_0_log.err"
    if err.is_file():
        lines = [line.strip() for line in err.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Failed)\b|^\w[\w.]*: ", line)]
        last = (errors or lines or [""])[-1][:160]
    return f"SLURM job {job_id} ended without {SUMMARY}" + (f": {last}" if last else "")


def _walk_runs(root: Path) -> list[Path]:
    """Run dirs at or below ``root``; hidden folders and run dirs' insides are not searched."""
    if is_run_dir(root):
        return [root]
    found: list[Path] = []
    for current, dirs, _ in os.walk(root):
        here = Path(current)
        keep = []
        for name in sorted(dirs, key=_natural):
            if name.startswith("."):
                continue
            if is_run_dir(here / name):
                found.append(here / name)
            else:
                keep.append(name)
        dirs[:] = keep
    return found


def _natural(name: str) -> tuple:
    """Sort key: job 10 after job 9."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name))


def find_runs(paths: Iterable[str]) -> list[Run]:
    """The runs named by ``paths`` (run dirs, sweep dirs, any folder above them, or globs of those),
    in order: argument order, then job order. A glob that matches nothing or a folder without runs
    is an SlmError."""
    dirs: list[Path] = []
    for text in paths:
        text = os.path.expanduser(str(text))
        if glob.has_magic(text):
            matches = sorted(glob.glob(text), key=_natural)
            if not matches:
                raise SlmError(f"no path matches {text}: check the pattern (quote it so that the shell "
                               "does not expand it first)")
            candidates = [Path(m) for m in matches if Path(m).is_dir()]
            found = [run for c in candidates for run in _walk_runs(c)]
            if not found:
                raise SlmError(f"no runs in the {len(matches)} paths matching {text}: a run dir holds "
                               f"{CONFIG} (written by slm train)")
        else:
            path = Path(text)
            if not path.exists():
                raise SlmError(f"{text} does not exist: pass a run dir, a sweep dir or a glob")
            if not path.is_dir():
                raise SlmError(f"{text} is a file: pass the run dir or sweep dir that holds it")
            found = _walk_runs(path)
            if not found:
                raise SlmError(f"no runs in {text}: pass a run dir (it holds {CONFIG}, written by slm train) "
                               "or a sweep dir of them")
        dirs.extend(found)
    unique = list(dict.fromkeys(d.resolve() for d in dirs))
    return [read_run(d) for d in unique]


def latest(roots: Iterable[Path]) -> Path | None:
    """The newest sweep or run under ``roots``: the sweep dir of the newest run if it belongs to
    one, else that run dir. Newest: by when the run was created (its .hydra/config.yaml)."""
    newest: tuple[float, Path] | None = None
    for root in roots:
        if not root.is_dir():
            continue
        for run_dir in _walk_runs(root):
            try:
                created = (run_dir / CONFIG).stat().st_mtime
            except OSError:
                continue
            if newest is None or created > newest[0]:
                newest = (created, run_dir)
    if newest is None:
        return None
    return sweep_of(newest[1]) or newest[1]
