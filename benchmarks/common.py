"""What the benchmarks share: the registry entry, paths, the timing set-up, tables, the
`slm` config, the corpus, child processes, and the clock that makes several `train()` runs take turns."""

from __future__ import annotations

import json
import os
import shutil
import statistics
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
@dataclass
class TurnRun:
    """What one run of :func:`interleaved_trains` reports: its iteration times (end of batch i-1 ->
    end of batch i), summary.json, and the probe's figures. The run has checked that torch kept the
    parent's thread count under Lightning."""

    iters: list[float]
    summary: dict[str, Any]
    probed: Any = None


@dataclass
class PairedSteps:
    """The timed steps of variants that take turns (:func:`interleaved_trains`), round by round, and
    their ratios to the ``baseline`` variant's: the figures selection_step and target_step report."""

    labels: list[str]
    baseline: str
    warmup: int  # untimed steps at the start of each run
    iters: dict[str, list[float]] = field(default_factory=dict)  # every timed step, seconds
    round_medians: dict[str, list[float]] = field(default_factory=dict)
    paired: dict[str, list[float]] = field(default_factory=dict)  # step i / baseline's step i, same cycle

    def add_round(self, runs: dict[str, TurnRun]) -> None:
        base = runs[self.baseline].iters[self.warmup:]
        for label in self.labels:
            timed = runs[label].iters[self.warmup:]
            self.iters.setdefault(label, []).extend(timed)
            self.round_medians.setdefault(label, []).append(statistics.median(timed))
            self.paired.setdefault(label, []).extend(a / b for a, b in zip(timed, base, strict=True))

    def median(self, label: str) -> float:
        """Median step time over all rounds, seconds."""
        return statistics.median(self.iters[label])

    def ratio(self, label: str) -> float:
        """Median of the paired per-step ratios: robust to load that changes between rounds (pooling
        the steps of a loaded and a quiet round mixes two step times)."""
        return statistics.median(self.paired[label])

    def per_round(self, label: str) -> list[float]:
        """Each round's median step time / the baseline's."""
        return [a / b for a, b in zip(self.round_medians[label], self.round_medians[self.baseline], strict=True)]

    def pooled(self, label: str) -> float:
        """Median step time over all rounds / the baseline's."""
        return self.median(label) / self.median(self.baseline)


def iteration_clock(turn: Callable[[], None] | None = None) -> L.Callback:
    """A Lightning callback recording each iteration: end of batch i-1 -> end of batch i (the first
    from on_train_start), so the loader fetch (with the per-token reference losses of rho1), every
    hook and logger call and training_step are all inside. ``turn`` (called at the end of each batch)
    hands the turn to the next variant and returns when it comes back; the clock restarts then."""
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
            if turn is not None:
                turn()
            self._mark = time.perf_counter()

    return Clock()


def _take_turns(cfg: DictConfig, run_dir: str, threads: int, probe: Callable[[], Callable[[], Any]] | None,
                conn: Any) -> None:
    """One variant of :func:`interleaved_trains`, in its own process: `train(cfg)` on the main thread,
    as `slm train` runs, computing only while it holds the turn (between a "go" from the scheduler
    and the "turn" it sends back at the end of each batch)."""
    import traceback
    import warnings

    import slm_cli.run as slm_run

    # Lightning's hint, once per process, that `srun` exists on this machine: the parent said it already.
    warnings.filterwarnings("ignore", message=".*`srun` command is available")
    try:
        timing_setup()
        probed = probe() if probe is not None else None

        def turn() -> None:
            conn.send(("turn",))
            conn.recv()

        clock = iteration_clock(turn)
        conn.send(("ready",))
        conn.recv()
        slm_run.train(cfg, callbacks=[clock])
        if clock.threads != threads:
            raise RuntimeError(f"torch threads changed under Lightning: {clock.threads} != {threads}")
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
        conn.send(("done", TurnRun(clock.iters, summary, probed() if probed else None)))
    except BaseException:  # noqa: BLE001 - reported by the scheduler
        conn.send(("error", traceback.format_exc()))


def interleaved_trains(jobs: list[tuple[str, list[str], Path]], threads: int,
                       probe: Callable[[], Callable[[], Any]] | None = None) -> dict[str, TurnRun]:
    """Run `slm_cli.run.train(cfg)` for every (label, overrides, run_dir) at once, one process each,
    taking turns step by step in the order of ``jobs``: step i of every variant, then step i+1...
    Setup, validation and the final checkpoint run inside a turn too, so no two variants ever
    compute at the same time, and a burst of outside load lands on neighbouring steps of different
    variants instead of on one variant's whole run.

    Processes, not threads: each run trains on its process's main thread with its own OpenMP pool,
    as `slm train` does. Threads in one process would share libgomp's thread count, and with more
    threads than cores libgomp stops its workers spinning between parallel regions, so every small
    region pays a wake-up (measured: the head's per-run exp of the kept rows took 27 ms per
    micro-batch on a second thread against 15 ms on the main one).

    ``probe`` (a module-level function, run in each child before training) returns a function whose
    result, read after training, comes back as :attr:`TurnRun.probed`."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    children: dict[str, tuple[Any, Any]] = {}
    try:
        for label, overrides, run_dir in jobs:  # Hydra's compose is global state: compose here
            shutil.rmtree(run_dir, ignore_errors=True)
            cfg = compose_train([*overrides, f"paths.output_dir={run_dir}", f"paths.log_dir={run_dir.parent}"])
            here, there = ctx.Pipe()
            proc = ctx.Process(target=_take_turns, args=(cfg, str(run_dir), threads, probe, there),
                               name=f"bench-{label}", daemon=True)
            proc.start()
            there.close()  # the child's end: a child that dies then reads as end-of-file here
            children[label] = (proc, here)
        runs: dict[str, TurnRun] = {}

        def receive(label: str, *expected: str) -> tuple:
            proc, conn = children[label]
            while not conn.poll(1.0):
                if not proc.is_alive():
                    raise RuntimeError(f"{label}: the benchmark process exited with {proc.exitcode}")
            try:
                msg = conn.recv()
            except EOFError:
                proc.join(5)
                raise RuntimeError(f"{label}: the benchmark process exited with {proc.exitcode}") from None
            if msg[0] == "error":
                raise RuntimeError(f"{label} failed:\n{msg[1]}")
            if msg[0] not in expected:
                raise RuntimeError(f"{label}: expected {expected}, got {msg[0]!r}")
            return msg

        for label in children:  # every child imported and built before the first step
            receive(label, "ready")
        live = [label for label, _, _ in jobs]
        while live:
            for label in list(live):
                children[label][1].send(("go",))
                msg = receive(label, "turn", "done")
                if msg[0] == "done":
                    runs[label] = msg[1]
                    live.remove(label)
        return runs
    finally:
        for proc, conn in children.values():
            conn.close()
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
