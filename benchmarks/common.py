"""What the benchmarks share: the registry entry, paths, the timing set-up, tables, the
`slm` config, the corpus, child processes, and the clock that makes several `train()` runs take turns."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import lightning as L
    from omegaconf import DictConfig

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
CACHE_DIR = BENCH_DIR / ".cache"  # scratch: prepared corpora, run dirs (not tracked)
RESULTS_DIR = BENCH_DIR / "results"
CORPORA_DIR = REPO_DIR / "corpora"  # the corpora vendored in the repo
WIKITEXT2_VALID = "wikitext-2/valid.txt"  # relative to CORPORA_DIR


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: ``run(quick)`` prints a small table and returns a dict of figures; ``children``
    are the measurements it runs in fresh processes (`run.py --child NAME JSON`, see :func:`run_child`)."""

    name: str
    help: str
    run: Callable[[bool], dict[str, Any]]
    children: dict[str, Callable[..., dict[str, Any]]] = field(default_factory=dict)


class BenchError(Exception):
    """A benchmark cannot run (e.g. a corpus file is missing); the runner prints it on one line."""


def timing_setup() -> int:
    """Every core for torch, and Lightning's per-run info lines silenced, for step-time benchmarks;
    returns the thread count."""
    import logging

    import torch

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    return threads


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table (also valid as a Markdown table body when pasted into the docs)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(cells[0]), sep, *(fmt(r) for r in cells[1:])])


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """An `slm` command's config (`train`, `score`...), composed exactly as the CLI composes it, plus
    `overrides`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module("slm_cli.conf", version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def compose_train(overrides: list[str]) -> DictConfig:
    """The `slm train` config plus `overrides`."""
    return compose("train", overrides)


def corpus_file(relative: str) -> Path:
    """``corpora/<relative>``, a corpus vendored in the repo; a BenchError naming it if it is missing
    (no fallback: another corpus would change the figures)."""
    path = CORPORA_DIR / relative
    if not path.is_file():
        raise BenchError(f"missing corpus file {path}")
    return path


def corpus_overrides() -> tuple[str, list[str]]:
    """The corpus of the step-time benchmarks: wikitext-2 valid with an 8192-token BPE; (label, overrides)."""
    return "wikitext-2 valid.txt", [f"paths.data_dir={CACHE_DIR / 'data'}", "data=text",
                                    f"data.path={corpus_file(WIKITEXT2_VALID)}", "data.name=wikitext2-valid-bpe8192",
                                    "data.vocab_size=8192"]


def prepared_corpus() -> tuple[str, list[str], Any]:
    """(label, overrides, PreparedData) of the step-time benchmarks' corpus, prepared if need be."""
    from slm_cli.data.prepare import prepare

    corpus, data = corpus_overrides()
    cfg = compose_train(data)
    return corpus, data, prepare(cfg.data, cfg.paths)


def run_child(name: str, **kwargs: Any) -> dict[str, Any]:
    """`run.py --child NAME JSON`: one measurement in a fresh process; the JSON it prints last."""
    out = subprocess.run([sys.executable, str(BENCH_DIR / "run.py"), "--child", name, json.dumps(kwargs)],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"child {name} {kwargs} exited with {out.returncode}:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- several `train()` runs taking turns step by step (selection_step, target_step) --------------
class Baton:
    """Lets one of several `train()` threads run at a time, taking turns in a fixed cyclic order.

    Only the holder computes; the others block on a condition variable, so the variants never
    compete for the cores, and a burst of outside load lands on consecutive steps of different
    variants instead of on one variant's whole run.
    """

    def __init__(self, labels: list[str]) -> None:
        import threading

        self._cond = threading.Condition()
        self._order = list(labels)
        self._live = set(labels)
        self._turn = 0
        self.error: BaseException | None = None

    def wait(self, label: str) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.error is not None or self._order[self._turn] == label)
            if self.error is not None:
                raise RuntimeError(f"stopped: another variant failed ({self.error!r})")

    def pass_on(self, done: str | None = None) -> None:
        """Hand the turn to the next live variant (``done``: the caller's run has ended)."""
        with self._cond:
            self._live.discard(done)
            n = len(self._order)
            for step in range(1, n + 1):
                if self._order[(self._turn + step) % n] in self._live:
                    self._turn = (self._turn + step) % n
                    break
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._cond:
            self.error = self.error or error
            self._cond.notify_all()


def iteration_clock(baton: Baton | None = None, label: str = "") -> L.Callback:
    """A Lightning callback recording each iteration: end of batch i-1 -> end of batch i (the first
    from on_train_start), so the loader fetch (with the per-token reference losses of rho1), every
    hook and logger call and training_step are all inside. With a ``baton`` it hands the turn to the
    next variant at the end of each batch, and its clock restarts when the turn comes back."""
    import lightning as L
    import torch

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.iters: list[float] = []
            self.threads = 0
            self._mark = 0.0

        def on_train_start(self, trainer, pl_module) -> None:
            self.threads = torch.get_num_threads()
            self._mark = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.iters.append(time.perf_counter() - self._mark)
            if baton is not None:
                baton.pass_on()
                baton.wait(label)
            self._mark = time.perf_counter()

    return Clock()


def interleaved_trains(jobs: list[tuple[str, list[str], Path]], threads: int) -> dict[str, tuple[Any, dict]]:
    """Run `slm_cli.run.train(cfg)` for every (label, overrides, run_dir) at once, one thread each,
    taking turns step by step in the order of ``jobs``: step i of every variant, then step i+1...
    Returns {label: (clock, summary.json)}. Setup, validation and the final checkpoint run inside a
    turn too, so no two variants ever compute at the same time."""
    import threading

    import torch

    import slm_cli.run as slm_run

    cfgs = {}
    for label, overrides, run_dir in jobs:  # Hydra's compose is global state: compose here, not in threads
        shutil.rmtree(run_dir, ignore_errors=True)
        cfgs[label] = compose_train([*overrides, f"paths.output_dir={run_dir}", f"paths.log_dir={run_dir.parent}"])
    baton = Baton([label for label, _, _ in jobs])
    clocks = {label: iteration_clock(baton, label) for label, _, _ in jobs}
    summaries: dict[str, dict] = {}

    def run(label: str, run_dir: Path) -> None:
        try:
            torch.set_num_threads(threads)
            baton.wait(label)
            slm_run.train(cfgs[label], callbacks=[clocks[label]])
            summaries[label] = json.loads((run_dir / "summary.json").read_text())
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            baton.fail(e)
        finally:
            baton.pass_on(done=label)

    workers = [threading.Thread(target=run, args=(label, run_dir), name=f"bench-{label}") for label, _, run_dir in jobs]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    if baton.error is not None:
        raise baton.error
    return {label: (clocks[label], summaries[label]) for label, _, _ in jobs}
