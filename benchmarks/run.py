"""slm benchmarks: `python benchmarks/run.py [names...] [--quick]` (what `make bench ARGS=...` runs).

Each benchmark is a function registered with :func:`benchmark`; it prints a small table and returns
a dict of figures, which the runner writes atomically to ``benchmarks/results/<name>.json``
(``<name>.quick.json`` with ``--quick``, so a smoke run never overwrites the recorded figures).
Scratch data (prepared corpora, run dirs) goes to ``benchmarks/.cache/`` (not tracked).
Figures and the machine they were measured on are in docs/benchmarks.md.

To add a benchmark: write ``def my_bench(quick: bool) -> dict`` in a section below, decorate it
with ``@benchmark("my_bench", "one line")``, and add a section to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
CACHE_DIR = BENCH_DIR / ".cache"
RESULTS_DIR = BENCH_DIR / "results"
# The shared wikitext-2 copy (../shared beside the checkout); when it is missing the benchmarks fall back to slm's stdlib corpus.
WIKITEXT2_VALID = BENCH_DIR.parent.parent / "shared" / "data" / "wikitext-2" / "valid.txt"


# ---- registry ------------------------------------------------------------------------------------
@dataclass
class Benchmark:
    name: str
    help: str
    fn: Callable[[bool], dict[str, Any]]


BENCHMARKS: dict[str, Benchmark] = {}


def benchmark(name: str, help: str) -> Callable:
    def register(fn: Callable[[bool], dict[str, Any]]) -> Callable[[bool], dict[str, Any]]:
        if name in BENCHMARKS:
            raise ValueError(f"benchmark {name!r} is registered twice")
        BENCHMARKS[name] = Benchmark(name, help, fn)
        return fn

    return register


# ---- shared helpers ------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import lightning
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "lightning": lightning.__version__, "python": platform.python_version()}


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table (also valid as a Markdown table body when pasted into the docs)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(cells[0]), sep, *(fmt(r) for r in cells[1:])])


def compose_train(overrides: list[str]):
    """The `slm train` config, composed exactly as the CLI composes it, plus `overrides`."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module("slm_cli.conf", version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def corpus_overrides() -> tuple[str, list[str]]:
    """A real corpus for the benchmarks: wikitext-2 valid if the shared copy is there, else stdlib."""
    data_dir = f"paths.data_dir={CACHE_DIR / 'data'}"
    if WIKITEXT2_VALID.is_file():
        return "wikitext-2 valid.txt", [data_dir, "data=text", f"data.path={WIKITEXT2_VALID}",
                                        "data.name=wikitext2-valid-bpe8192", "data.vocab_size=8192"]
    return "python stdlib (first 4 MB)", [data_dir, "data=stdlib", "data.name=stdlib-4mb-bpe8192",
                                          "data.max_bytes=4000000", "data.vocab_size=8192"]


# ---- clm_step: slm's CLM training step vs a minimal plain-PyTorch loop ---------------------------
CLM_FULL = {"model": "gpt2-micro", "batch_size": 4, "rounds": 3, "steps": 30, "warmup": 3}
CLM_QUICK = {"model": "gpt2-nano", "batch_size": 8, "rounds": 2, "steps": 15, "warmup": 2}


class PlainLoop:
    """The minimal nanoGPT loop on the same model, init, windows, optimizer and schedule as slm.

    ``step()`` is one iteration (fetch the batch, full logits, F.cross_entropy, backward, clip,
    AdamW, zero_grad, LR schedule) and returns its wall time and loss; a standalone plain run is
    ``for _ in range(n): loop.step()``.
    """

    def __init__(self, cfg) -> None:
        import torch

        from slm_cli import optim
        from slm_cli.data.prepare import prepare
        from slm_cli.data.windows import StepSampler, TrainWindows
        from slm_cli.model.gpt import GPT
        from slm_cli.train import model_config

        prepared = prepare(cfg.data, cfg.paths)
        gpt = model_config(cfg, prepared)
        torch.manual_seed(cfg.seed)  # what train()'s L.seed_everything does for the CPU generator
        self.model = GPT(gpt).train()
        self.opt, self.sched = optim.build(self.model.param_groups(cfg.optim.weight_decay), cfg.optim,
                                           cfg.optim.decay_steps or cfg.trainer.max_steps)
        self.windows = TrainWindows(prepared.tokens("train"), gpt.block_size, cfg.seed)
        self.sampler = iter(StepSampler(cfg.data.batch_size))
        self.params = list(self.model.parameters())
        self.grad_clip = cfg.optim.grad_clip

    def step(self) -> tuple[float, float]:
        import torch
        import torch.nn.functional as F

        t0 = time.perf_counter()
        batch = self.windows[next(self.sampler)]
        x, y = batch["input_ids"], batch["labels"]
        logits = self.model.logits(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        value = loss.item()
        return time.perf_counter() - t0, value


def _interleaved_clock(plain: PlainLoop, plain_first: bool):
    """A Lightning callback that times slm's steps and runs one plain step next to each of them.

    Pairing the two sides step by step puts both under the same load on a shared machine. An slm
    iteration is timed end to end (end of batch i-1 -> end of batch i, minus the plain step run in
    between), so it includes the loader fetch and every hook and logger call Lightning makes per
    step, not only training_step. ``plain_first`` runs the plain step before slm's step of the pair
    (in on_train_batch_start) instead of after it (on_train_batch_end).
    """
    import lightning as L
    import torch

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.slm_iter: list[float] = []
            self.slm_step: list[float] = []
            self.slm_loss: list[float] = []
            self.plain_iter: list[float] = []
            self.plain_loss: list[float] = []
            self.threads = 0
            self._mark = self._start = 0.0
            self._excluded = 0.0

        def _plain_step(self) -> None:
            seconds, loss = plain.step()
            self.plain_iter.append(seconds)
            self.plain_loss.append(loss)
            self._excluded += seconds

        def on_train_start(self, trainer, pl_module) -> None:
            self.threads = torch.get_num_threads()
            self._mark = time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if plain_first:
                self._plain_step()
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            t = time.perf_counter()
            self.slm_iter.append(t - self._mark - self._excluded)
            self.slm_step.append(t - self._start)
            self.slm_loss.append(float(trainer.callback_metrics["train/loss"]))
            self._excluded = 0.0
            if not plain_first:
                self._plain_step()
                self._excluded = 0.0
            self._mark = time.perf_counter()

    return Clock()


def _paired_round(overrides: list[str], run_dir: Path, plain_first: bool):
    """`slm_cli.train.train(cfg)`, the real path, with the pairing clock added to its Trainer."""
    import slm_cli.train as slm_train

    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run dir per round (and no stale logs)
    cfg = compose_train([*overrides, f"paths.output_dir={run_dir}", f"paths.log_dir={run_dir.parent}"])
    clock = _interleaved_clock(PlainLoop(cfg), plain_first)
    real_build = slm_train.build_trainer

    def build_trainer(cfg, run_dir):
        trainer = real_build(cfg, run_dir)
        trainer.callbacks.insert(0, clock)
        return trainer

    slm_train.build_trainer = build_trainer
    try:
        slm_train.train(cfg)
    finally:
        slm_train.build_trainer = real_build
    return clock


@benchmark("clm_step", "slm CLM training step (slm train, Lightning) vs a minimal plain-PyTorch loop")
def clm_step(quick: bool) -> dict[str, Any]:
    import logging

    import torch

    p = CLM_QUICK if quick else CLM_FULL
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # = nproc
    torch.set_num_threads(threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    corpus, data = corpus_overrides()
    n_steps = p["warmup"] + p["steps"]
    overrides = [
        *data, f"model={p['model']}", f"data.batch_size={p['batch_size']}", "seed=1337",
        f"trainer.max_steps={n_steps}", f"trainer.val_check_interval={n_steps}", "trainer.limit_val_batches=1",
        f"trainer.checkpoint_every_n_steps={10**9}", "trainer.enable_progress_bar=false", "logger=csv",
    ]
    cfg = compose_train(overrides)
    from slm_cli.data.prepare import prepare

    t0 = time.perf_counter()
    prepared = prepare(cfg.data, cfg.paths)  # cached in benchmarks/.cache/data after the first run
    prepare_s = time.perf_counter() - t0
    tokens_per_step = cfg.data.batch_size * cfg.model.block_size
    print(f"corpus: {corpus} -> {prepared.dir} ({prepared.meta['train_tokens']:,} train tokens, "
          f"vocab {prepared.vocab_size}; prepare {prepare_s:.1f}s)")
    print(f"model: {p['model']} (L={cfg.model.n_layer} H={cfg.model.n_head} d={cfg.model.n_embd} "
          f"T={cfg.model.block_size}), B={cfg.data.batch_size} -> {tokens_per_step} tokens/step; "
          f"torch threads {threads}; {p['rounds']} rounds x {p['steps']} timed steps per side "
          f"(+{p['warmup']} warmup steps, not timed)")

    w = p["warmup"]
    slm_iters: list[float] = []
    slm_steps: list[float] = []
    plain_iters: list[float] = []
    rows, per_round, losses = [], [], []
    for r in range(p["rounds"]):
        plain_first = r % 2 == 1  # alternate which side goes first in each pair
        clock = _paired_round(overrides, CACHE_DIR / "runs" / "clm_step" / f"round{r}", plain_first)
        if clock.threads != threads:
            raise RuntimeError(f"torch threads changed under Lightning: {clock.threads} != {threads}")
        it, st, pit = clock.slm_iter[w:], clock.slm_step[w:], clock.plain_iter[w:]
        slm_iters += it
        slm_steps += st
        plain_iters += pit
        s_med, p_med = statistics.median(it), statistics.median(pit)
        per_round.append(p_med / s_med)
        losses.append((clock.slm_loss, clock.plain_loss))
        rows.append([f"round {r + 1} ({'plain' if plain_first else 'slm'} first)", f"{s_med * 1e3:.0f}",
                     f"{statistics.median(st) * 1e3:.0f}", f"{p_med * 1e3:.0f}", f"{p_med / s_med:.3f}"])

    s_med, p_med = statistics.median(slm_iters), statistics.median(plain_iters)
    step_med = statistics.median(slm_steps)
    ratio = p_med / s_med
    paired = statistics.median(b / a for a, b in zip(slm_iters, plain_iters, strict=True))
    rows.append(["all rounds", f"{s_med * 1e3:.0f}", f"{step_med * 1e3:.0f}", f"{p_med * 1e3:.0f}", f"{ratio:.3f}"])
    print()
    print(table(["median per step", "slm ms/iter", "slm ms/training_step", "plain ms/iter",
                 "tokens/s slm / plain"], rows))
    print(f"\ntokens/s: slm {tokens_per_step / s_med:,.0f}, plain {tokens_per_step / p_med:,.0f}: "
          f"ratio {ratio:.3f} (goal >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'}); "
          f"median of the {len(slm_iters)} paired step ratios {paired:.3f}")
    print("slm ms/iter: end of batch i-1 -> end of batch i (loader + Lightning hooks + logging + training_step); "
          "slm ms/training_step: on_train_batch_start -> on_train_batch_end; plain ms/iter: batch fetch -> "
          "sched.step()")

    # Same work: the same init and windows must give (nearly) the same loss curve on both sides.
    first_diff = max(abs(sl[0] - pl[0]) for sl, pl in losses)
    last_diff = max(abs(sl[-1] - pl[-1]) for sl, pl in losses)
    s_last, p_last = losses[-1][0][-1], losses[-1][1][-1]
    print(f"training loss: step 1 slm {losses[-1][0][0]:.4f} plain {losses[-1][1][0]:.4f}; step {n_steps} "
          f"slm {s_last:.4f} plain {p_last:.4f} (max |diff| over rounds: step 1 {first_diff:.1e}, "
          f"step {n_steps} {last_diff:.1e})")
    if first_diff > 1e-4 or last_diff > 1e-2 * max(1.0, abs(p_last)):
        raise AssertionError(f"slm and the plain loop disagree on the training loss (step 1: {first_diff:.2e}, "
                             f"step {n_steps}: {last_diff:.2e}): they are not doing the same work")

    return {
        "quick": quick, "corpus": corpus, "model": p["model"], "n_layer": cfg.model.n_layer,
        "n_head": cfg.model.n_head, "n_embd": cfg.model.n_embd, "block_size": cfg.model.block_size,
        "batch_size": cfg.data.batch_size, "vocab_size": prepared.vocab_size, "tokens_per_step": tokens_per_step,
        "rounds": p["rounds"], "timed_steps_per_round": p["steps"], "warmup_steps": w,
        "slm_ms_per_iter": s_med * 1e3, "slm_ms_per_training_step": step_med * 1e3, "plain_ms_per_iter": p_med * 1e3,
        "slm_tokens_per_s": tokens_per_step / s_med, "plain_tokens_per_s": tokens_per_step / p_med,
        "ratio": ratio, "ratio_per_round": per_round, "ratio_paired_median": paired, "goal": 0.95,
        "loss_slm": s_last, "loss_plain": p_last, "loss_max_abs_diff_first": first_diff,
        "loss_max_abs_diff_last": last_diff,
    }


# ---- selection_step: step time of each selection strategy relative to CLM -----------------------
# GPT-2's vocabulary (50304 = 50257 padded to a multiple of 64) on a small trunk, so the LM head is
# most of the step: what token selection can save is the head's backward on the dropped rows.
SEL_FULL = {"n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 256, "batch_size": 8, "vocab_size": 50304,
            "rounds": 3, "steps": 5, "warmup": 2, "optional": True}
SEL_QUICK = {"n_layer": 2, "n_head": 2, "n_embd": 128, "block_size": 128, "batch_size": 4, "vocab_size": 50304,
             "rounds": 2, "steps": 3, "warmup": 1, "optional": False}
REF_NAME = "bench-ref"  # the score folder ref-bench-ref/ beside the benchmark corpus's train.bin
# The rho1 reference: only its per-token losses matter here (read from disk during training), so it is
# gpt2-nano cut to L=2, d=64 and trained for a few dozen steps, which keeps `slm score` under ~30 s.
REF_MODEL = ["model=gpt2-nano", "model.n_layer=2", "model.n_head=2", "model.n_embd=64"]
REF_STEPS = 40


@dataclass
class Variant:
    label: str
    overrides: list[str]
    keep: float  # nominal keep ratio k
    goal: float | None  # goal for step time / CLM's step time (None: no goal, for comparison)


def _selection_variants(ref_ckpt: Path, optional: bool) -> list[Variant]:
    rho1 = ["selection=rho1", f"data.tokenizer={ref_ckpt}", f"selection.reference.name={REF_NAME}"]
    variants = [
        Variant("clm", ["selection=clm"], 1.0, None),
        Variant("eslm", ["selection=eslm"], 0.6, 1.00),
        Variant("eslm score=entropy", ["selection=eslm", "selection.score=entropy"], 0.6, 1.00),
        Variant("rho1", rho1, 0.6, 1.00),
        Variant("eslm alpha=0.6", ["selection=eslm", "selection.alpha=0.6"], 0.4, 0.90),
        Variant("rho1 ratio=0.4", [*rho1, "selection.ratio=0.4"], 0.4, 0.90),
    ]
    if optional:  # for the cost model: the head's backward at 1 + 3k instead of 1 + 2k
        variants.append(Variant("eslm alpha=0.6 recompute",
                                ["selection=eslm", "selection.alpha=0.6", "loss.keep_probs=false"], 0.4, None))
    return variants


def compose_score(overrides: list[str]):
    """The `slm score` config, composed exactly as the CLI composes it, plus `overrides`."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module("slm_cli.conf", version_base="1.3"):
        return compose(config_name="score", overrides=overrides)


class _Baton:
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


def _iteration_clock(baton: _Baton | None = None, label: str = ""):
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


_THREAD_CALLBACKS: dict[int, list] = {}  # thread id -> callbacks for the Trainer that thread builds


def _interleaved_trains(jobs: list[tuple[str, list[str], Path]], threads: int) -> dict[str, tuple[Any, dict]]:
    """Run `slm_cli.train.train(cfg)` for every (label, overrides, run_dir) at once, one thread each,
    taking turns step by step in the order of ``jobs``: step i of every variant, then step i+1...
    Returns {label: (clock, summary.json)}. Setup, validation and the final checkpoint run inside a
    turn too, so no two variants ever compute at the same time."""
    import threading

    import torch

    import slm_cli.train as slm_train

    cfgs = {}
    for label, overrides, run_dir in jobs:  # Hydra's compose is global state: compose here, not in threads
        shutil.rmtree(run_dir, ignore_errors=True)
        cfgs[label] = compose_train([*overrides, f"paths.output_dir={run_dir}", f"paths.log_dir={run_dir.parent}"])
    baton = _Baton([label for label, _, _ in jobs])
    clocks = {label: _iteration_clock(baton, label) for label, _, _ in jobs}
    summaries: dict[str, dict] = {}
    real_build = slm_train.build_trainer

    def build_trainer(cfg, run_dir):
        trainer = real_build(cfg, run_dir)
        for cb in reversed(_THREAD_CALLBACKS.get(threading.get_ident(), [])):
            trainer.callbacks.insert(0, cb)
        return trainer

    def run(label: str, run_dir: Path) -> None:
        try:
            torch.set_num_threads(threads)
            _THREAD_CALLBACKS[threading.get_ident()] = [clocks[label]]
            baton.wait(label)
            slm_train.train(cfgs[label])
            summaries[label] = json.loads((run_dir / "summary.json").read_text())
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            baton.fail(e)
        finally:
            baton.pass_on(done=label)

    slm_train.build_trainer = build_trainer
    try:
        workers = [threading.Thread(target=run, args=(label, run_dir), name=f"bench-{label}")
                   for label, _, run_dir in jobs]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
    finally:
        slm_train.build_trainer = real_build
        _THREAD_CALLBACKS.clear()
    if baton.error is not None:
        raise baton.error
    return {label: (clocks[label], summaries[label]) for label, _, _ in jobs}


def _reference(data: list[str], prepared, threads: int) -> Path:
    """A tiny gpt2-nano reference trained with CLM on the benchmark corpus (same BPE, so the data
    folder is shared), scored over train.bin with `slm score`'s code path. Cached in .cache/."""
    from slm_cli.errors import SlmError
    from slm_cli.reference import load_scores, score

    run_dir = CACHE_DIR / "runs" / "selection_step" / f"reference-L2-d64-{REF_STEPS}steps"  # new settings: new dir
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if ckpt.is_file():
        with contextlib.suppress(SlmError):
            load_scores(prepared, name=REF_NAME)
            print(f"reference: {ckpt} and its scores in {prepared.dir / f'ref-{REF_NAME}'} (cached)")
            return ckpt
    t0 = time.perf_counter()
    overrides = [*data, *REF_MODEL, "data.batch_size=16", "seed=1337", f"trainer.max_steps={REF_STEPS}",
                 f"trainer.val_check_interval={REF_STEPS}", "trainer.limit_val_batches=2",
                 f"trainer.checkpoint_every_n_steps={10**9}", "trainer.enable_progress_bar=false", "logger=csv"]
    _interleaved_trains([("reference", overrides, run_dir)], threads)
    train_s = time.perf_counter() - t0
    # context = the reference's block size; stride = context scores each token once with less overlap.
    os.environ["TQDM_MININTERVAL"] = "600"  # the progress bar's first and last lines only
    try:
        result = score(compose_score([*data, f"ckpt_path={ckpt}", f"name={REF_NAME}", "stride=128", "batch_size=32"]))
    finally:
        del os.environ["TQDM_MININTERVAL"]
    print(f"reference: gpt2-nano L=2 d=64, {REF_STEPS} CLM steps ({train_s:.0f}s) -> {ckpt}; scored {result['tokens']:,} "
          f"tokens at {result['tokens_per_s']:,.0f} tokens/s")
    return ckpt


@benchmark("selection_step", "step time of each selection strategy / CLM's (slm train, GPT-2 vocabulary)")
def selection_step(quick: bool) -> dict[str, Any]:
    import logging

    import torch

    from slm_cli.data.prepare import prepare
    from slm_cli.selection.base import keep_count

    p = SEL_QUICK if quick else SEL_FULL
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    corpus, data = corpus_overrides()
    prepared = prepare(compose_train(data).data, compose_train(data).paths)
    ref_ckpt = _reference(data, prepared, threads)

    n_steps = p["warmup"] + p["steps"]
    model = [f"model.{k}={p[k]}" for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")]
    base = [
        *data, "model=gpt2-nano", "model.name=bench-selection", *model, f"data.batch_size={p['batch_size']}",
        "seed=1337", f"trainer.max_steps={n_steps}", f"trainer.val_check_interval={n_steps}",
        "trainer.limit_val_batches=1", f"trainer.checkpoint_every_n_steps={10**9}",
        "trainer.enable_progress_bar=false", "logger=csv",
    ]
    M = p["batch_size"] * p["block_size"]
    variants = _selection_variants(ref_ckpt, p["optional"])
    print(f"corpus: {corpus} -> {prepared.dir} ({prepared.meta['train_tokens']:,} train tokens, tokenizer vocab "
          f"{prepared.vocab_size}); model: L={p['n_layer']} H={p['n_head']} d={p['n_embd']} T={p['block_size']}, "
          f"head vocab {p['vocab_size']}, B={p['batch_size']} -> M={M} tokens/step; torch threads {threads}; "
          f"{p['rounds']} rounds x {len(variants)} variants x {p['steps']} timed steps (+{p['warmup']} warmup)")

    w = p["warmup"]
    iters: dict[str, list[float]] = {v.label: [] for v in variants}
    round_med: dict[str, list[float]] = {v.label: [] for v in variants}
    paired: dict[str, list[float]] = {v.label: [] for v in variants}  # step i / CLM's step i, same cycle
    summaries: dict[str, dict[str, Any]] = {}
    orders = []
    for r in range(p["rounds"]):
        # Alternate the order within the cycle: forward, then reversed (then rotated...).
        shift = (r // 2) * len(variants) // max(1, p["rounds"])
        order = variants[shift:] + variants[:shift]
        order = order[::-1] if r % 2 else order
        orders.append([v.label for v in order])
        t0 = time.perf_counter()
        done = _interleaved_trains([(v.label, [*base, *v.overrides],
                                     CACHE_DIR / "runs" / "selection_step" / v.label.replace(" ", "_").replace("=", ""))
                                    for v in order], threads)
        for v in order:
            clock, summary = done[v.label]
            shutil.rmtree(Path(summary["checkpoint"]).parent, ignore_errors=True)  # ~200 MB each, not needed
            if clock.threads != threads:
                raise RuntimeError(f"torch threads changed under Lightning: {clock.threads} != {threads}")
            timed = clock.iters[w:]
            iters[v.label] += timed
            round_med[v.label].append(statistics.median(timed))
            paired[v.label] += [a / b for a, b in zip(timed, done["clm"][0].iters[w:], strict=True)]
            summaries[v.label] = summary
        print(f"round {r + 1} ({time.perf_counter() - t0:.0f}s), cycle order: {' -> '.join(orders[-1])}")
        print("  ms/step (median): " + ", ".join(f"{v.label} {round_med[v.label][-1] * 1e3:.0f}" for v in variants),
              flush=True)

    clm_med = statistics.median(iters["clm"])
    rows, figures = [], {}
    for v in variants:
        med = statistics.median(iters[v.label])
        per_round = [a / b for a, b in zip(round_med[v.label], round_med["clm"], strict=True)]
        # The overall ratio is the median of the paired per-step ratios: robust to load that changes
        # between rounds (pooling the steps of a loaded and a quiet round mixes two step times).
        ratio = statistics.median(paired[v.label])
        pooled = med / clm_med
        s = summaries[v.label]
        frac = s["selected_tokens"] / s["train_tokens"]
        expected = keep_count(v.keep, M) / M
        if abs(frac - expected) > 1e-12:
            raise AssertionError(f"{v.label}: selected_tokens/train_tokens = {frac} but ceil(k*M)/M = {expected}")
        goal = "" if v.goal is None else f"<= {v.goal:.2f} {'met' if ratio <= v.goal else 'NOT met'}"
        rows.append([v.label, f"{v.keep:.1f}", f"{frac:.4f}", f"{med * 1e3:.0f}",
                     " ".join(f"{x:.3f}" for x in per_round), f"{ratio:.3f}", f"{pooled:.3f}", goal,
                     f"{1 - ratio:+.3f}", f"{s['flops_saved_frac_realized']:.3f}", f"{s['flops_saved_frac']:.3f}"])
        figures[v.label] = {
            "overrides": v.overrides, "keep": v.keep, "selected_frac": frac, "expected_selected_frac": expected,
            "ms_per_step": med * 1e3, "ms_per_step_per_round": [x * 1e3 for x in round_med[v.label]],
            "ratio": ratio, "ratio_per_round": per_round, "ratio_median_of_rounds": statistics.median(per_round),
            "ratio_pooled": pooled,
            "goal": v.goal, "time_saved_frac": 1 - ratio,
            "flops_saved_frac_realized": s["flops_saved_frac_realized"], "flops_saved_frac": s["flops_saved_frac"],
        }
    print()
    print(table(["variant", "k", "selected/M", "ms/step", "ratio per round", "ratio", "pooled", "goal", "time saved",
                 "realised saved", "nominal saved"], rows))
    print(f"\nms/step: median over all rounds of end of batch i-1 -> end of batch i (loader, hooks, logging, "
          f"training_step); ratio per round = the round's median ms/step / CLM's; ratio = median over all timed "
          f"steps of step i / CLM's step i of the same cycle; pooled = median ms/step / CLM's ({clm_med * 1e3:.0f} "
          f"ms); time saved = 1 - ratio; "
          f"realised/nominal saved: summary.json flops_saved_frac_realized / flops_saved_frac; "
          f"selected/M = ceil(k*M)/M checked for every variant")
    return {
        "quick": quick, "corpus": corpus, **{k: p[k] for k in ("n_layer", "n_head", "n_embd", "block_size",
                                                                "batch_size", "vocab_size")},
        "tokenizer_vocab": prepared.vocab_size, "tokens_per_step": M, "rounds": p["rounds"],
        "timed_steps_per_round": p["steps"], "warmup_steps": w, "orders": orders, "reference": str(ref_ckpt),
        "clm_ms_per_step": clm_med * 1e3, "variants": figures,
    }


# ---- loss_memory: peak memory of slm's loss path vs naive full logits ----------------------------
MEM_FULL = {"m": 8192, "d": 256, "v": 50304, "chunk_size": 4096}
MEM_QUICK = {"m": 2048, "d": 256, "v": 50304, "chunk_size": 4096}
MEM_VARIANTS = [  # (label, loss path, keep ratio)
    ("naive F.cross_entropy(hidden @ W.T)", "naive", 1.0),
    ("slm store, CLM", "store", 1.0),
    ("slm store, keep 0.6", "store", 0.6),
    ("slm recompute, CLM", "recompute", 1.0),
    ("slm recompute, keep 0.6", "recompute", 0.6),
]


def _maxrss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _loss_memory_child(path: str, keep: float, m: int, d: int, v: int, chunk_size: int) -> dict[str, Any]:
    """One variant in this (fresh) process: peak RSS above the baseline, for forward + backward."""
    import torch
    import torch.nn.functional as F

    from slm_cli.loss import token_stats, weighted_loss
    from slm_cli.selection.base import keep_count, top_k_mask

    torch.manual_seed(0)
    hidden = torch.randn(m, d).requires_grad_()
    weight = (torch.randn(v, d) * 0.02).requires_grad_()
    labels = torch.randint(0, v, (m,))
    # One warm small op (kernels, allocator, autograd engine) before the baseline is read.
    F.cross_entropy(hidden[:16] @ weight[:256].T, labels[:16] % 256).backward()
    hidden.grad = weight.grad = None
    baseline = _maxrss_mib()
    t0 = time.perf_counter()
    if path == "naive":
        loss = F.cross_entropy(hidden @ weight.T, labels)
    else:
        stats = token_stats(hidden.detach(), weight.detach(), labels, chunk_size=chunk_size,
                            keep_probs=path == "store")
        mask = torch.ones(m, dtype=torch.bool) if keep == 1.0 else top_k_mask(stats.loss, keep_count(keep, m))[0]
        weights = mask.float() / mask.sum()
        loss = weighted_loss(hidden, weight, labels, weights, stats, chunk_size=chunk_size)
    loss.backward()
    seconds = time.perf_counter() - t0
    return {"baseline_mib": baseline, "peak_mib": _maxrss_mib(), "seconds": seconds, "loss": float(loss),
            "grad_norm": float(torch.linalg.vector_norm(weight.grad))}


def _child(argv: list[str]) -> int:
    """`run.py --child NAME JSON`: a benchmark's measurement in a fresh process; prints JSON."""
    name, kwargs = argv[0], json.loads(argv[1])
    children = {"loss_memory": _loss_memory_child}
    print(json.dumps(children[name](**kwargs)))
    return 0


@benchmark("loss_memory", "peak memory of slm's chunked loss (forward + backward) vs naive full logits")
def loss_memory(quick: bool) -> dict[str, Any]:
    import subprocess

    p = MEM_QUICK if quick else MEM_FULL
    m, d, v = p["m"], p["d"], p["v"]
    one = m * v * 4 / 2**20
    print(f"hidden ({m}, {d}) and head weight ({v}, {d}), float32, both requiring grad; chunk_size "
          f"{p['chunk_size']}; one ({m}, {v}) float32 tensor = {one:,.0f} MiB; each variant in a fresh process")
    results = {}
    for label, path, keep in MEM_VARIANTS:
        args = json.dumps({"path": path, "keep": keep, **p})
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "loss_memory", args],
                             capture_output=True, text=True, check=True)
        results[label] = json.loads(out.stdout.strip().splitlines()[-1]) | {"path": path, "keep": keep}
        r = results[label]
        print(f"  {label:36s} +{r['peak_mib'] - r['baseline_mib']:7,.0f} MiB ({r['seconds']:.1f}s)", flush=True)

    naive = results[MEM_VARIANTS[0][0]]
    naive_inc = naive["peak_mib"] - naive["baseline_mib"]
    rows, figures = [], {}
    for label, path, _keep in MEM_VARIANTS:
        r = results[label]
        inc = r["peak_mib"] - r["baseline_mib"]
        ratio = inc / naive_inc
        goal = "" if path == "naive" else f"<= 0.5 {'met' if ratio <= 0.5 else 'NOT met'}"
        rows.append([label, f"{r['baseline_mib']:,.0f}", f"{r['peak_mib']:,.0f}", f"{inc:,.0f}", f"{inc / one:.2f}",
                     f"{ratio:.3f}", goal, f"{r['loss']:.5f}"])
        figures[label] = {**r, "increase_mib": inc, "increase_in_MV_tensors": inc / one, "ratio_to_naive": ratio}
    # Same work: the CLM variants must give the naive loss and head gradient (keep 0.6 trains a subset).
    for label, _path, keep in MEM_VARIANTS:
        r = results[label]
        if keep == 1.0 and (abs(r["loss"] - naive["loss"]) > 1e-4 * max(1.0, abs(naive["loss"]))
                            or abs(r["grad_norm"] - naive["grad_norm"]) > 1e-3 * naive["grad_norm"]):
            raise AssertionError(f"{label}: loss {r['loss']} / |grad W| {r['grad_norm']} differ from naive's "
                                 f"({naive['loss']} / {naive['grad_norm']})")
    print()
    print(table(["variant", "baseline MiB", "peak MiB", "increase MiB", "in (M,V) tensors", "ratio to naive",
                 "goal", "loss"], rows))
    print(f"\nincrease = peak RSS (ru_maxrss) after forward + backward - peak RSS after allocating the inputs and "
          f"one warm small op; one ({m}, {v}) float32 tensor = {one:,.0f} MiB")
    return {"quick": quick, **p, "one_MV_tensor_mib": one, "variants": figures}


# ---- runner --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # internal: one measurement in a fresh process (loss_memory)
        return _child(argv[1:])
    listing = "\n".join(f"  {b.name:12s} {b.help}" for b in BENCHMARKS.values())
    parser = argparse.ArgumentParser(description="slm benchmarks (figures: docs/benchmarks.md)",
                                     epilog=f"benchmarks:\n{listing}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="smaller settings: a smoke run, not figures")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")

    from slm_cli.outputs import write_json

    for name in args.names or list(BENCHMARKS):
        print(f"== {name}{' (--quick)' if args.quick else ''}: {BENCHMARKS[name].help}", flush=True)
        t0 = time.perf_counter()
        figures = BENCHMARKS[name].fn(args.quick)
        wall = time.perf_counter() - t0
        record = {"benchmark": name, "figures": figures, "wall_s": round(wall, 1), "machine": machine(),
                  "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        out = write_json(RESULTS_DIR / f"{name}{'.quick' if args.quick else ''}.json",
                         _finite(record))
        print(f"== {name}: {wall:.0f}s; figures -> {out.relative_to(BENCH_DIR.parent)}\n", flush=True)
    return 0


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


if __name__ == "__main__":
    sys.exit(main())
