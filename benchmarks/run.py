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
import io
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
    with contextlib.redirect_stderr(io.StringIO()):  # `slm score`'s progress bar (errors still raise)
        result = score(compose_score([*data, f"ckpt_path={ckpt}", f"name={REF_NAME}", "stride=128", "batch_size=32"]))
    print(f"reference: gpt2-nano L=2 d=64, {REF_STEPS} CLM steps ({train_s:.0f}s) -> {ckpt}; scored {result['tokens']:,} "
          f"tokens at {result['tokens_per_s']:,.0f} tokens/s")
    return ckpt


@benchmark("selection_step", "step time of each selection strategy / CLM's (slm train, GPT-2 vocabulary)")
def selection_step(quick: bool) -> dict[str, Any]:


    from slm_cli.data.prepare import prepare
    from slm_cli.selection.base import keep_count

    p = SEL_QUICK if quick else SEL_FULL
    threads = timing_setup()
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
MEM_FULL = {"m": 8192, "d": 256, "v": 50304, "chunk_size": 1024}
MEM_QUICK = {"m": 2048, "d": 256, "v": 50304, "chunk_size": 1024}
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
    children = {"loss_memory": _loss_memory_child, "ngram_build": _ngram_build_child,
                "ngram_trie": _ngram_trie_child}
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


# ---- ngram_build: `slm ngram`'s vectorised build vs a count-trie port of the authors' design ----
NGRAM_FULL = {"tokens": 10_000_000, "ns": (3, 4, 5), "r": 8, "rounds": 3, "prefix": 1_000_000}
NGRAM_QUICK = {"tokens": 2_000_000, "ns": (4,), "r": 8, "rounds": 1, "prefix": 50_000}
NGRAM_VOCAB = 4096  # 12-bit ids: n = 5 fits the 64-bit key (5 x 12 = 60 bits)
NGRAM_ZIPF = 1.1
# (shards, chunk_tokens): `slm ngram`'s default, and 4 hash shards with 2^22-token chunks, which
# shrink the per-chunk work arrays as well as the tables (docs/ngram.md)
NGRAM_SHARDINGS = ((1, 1 << 24), (4, 1 << 22))


def _ngram_streams(n_tokens: int) -> dict[str, dict[str, Any]]:
    """The two token streams of ngram_build as uint16 .bin files in .cache/ngram/ (V = 4096):
    real text (the shared corpora + stdlib source, one BPE) and i.i.d. Zipf(1.1) ids."""
    import numpy as np

    from slm_cli.data.prepare import prepare

    out_dir = CACHE_DIR / "ngram"
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = f"paths.data_dir={CACHE_DIR / 'data'}"
    shared = WIKITEXT2_VALID.parent.parent  # ../shared/data: wikitext-2/{valid,test}.txt, tinyshakespeare/input.txt
    parts, sources = [], []
    if shared.is_dir() and any(shared.glob("*/*.txt")):
        cfg = compose_train([data_dir, "data=text", f"data.path={shared}/*/*.txt", "data.name=shared-text-bpe4096",
                             f"data.vocab_size={NGRAM_VOCAB}"])
        text = prepare(cfg.data, cfg.paths)
        tokenizer = [f"data.tokenizer={text.tokenizer_path}"]
        parts += [text.tokens("train"), text.tokens("val")]
        sources.append(f"{', '.join(sorted(str(p.relative_to(shared)) for p in shared.glob('*/*.txt')))} "
                       f"({text.meta['train_tokens'] + text.meta['val_tokens']:,} tokens)")
    else:
        tokenizer = [f"data.vocab_size={NGRAM_VOCAB}"]  # no shared copy: a BPE trained on the stdlib text
    cfg = compose_train([data_dir, "data=stdlib", "data.name=stdlib-bpe4096", *tokenizer])  # all of it: ~25 MB
    code = prepare(cfg.data, cfg.paths)
    if code.vocab_size != NGRAM_VOCAB:
        raise RuntimeError(f"{code.dir}: vocabulary {code.vocab_size}, expected {NGRAM_VOCAB}")
    parts += [code.tokens("train"), code.tokens("val")]
    sources.append(f"the stdlib source ({code.meta['train_tokens'] + code.meta['val_tokens']:,} tokens)")
    real = np.concatenate([np.asarray(p, dtype=np.uint16) for p in parts])
    distinct = len(real)
    tiles = math.ceil(n_tokens / distinct)
    real = np.tile(real, tiles)[:n_tokens] if tiles > 1 else real[:n_tokens]

    rng = np.random.default_rng(0)
    weights = 1.0 / np.arange(1, NGRAM_VOCAB + 1, dtype=np.float64) ** NGRAM_ZIPF
    ranks = rng.choice(NGRAM_VOCAB, size=n_tokens, p=weights / weights.sum())
    zipf = rng.permutation(NGRAM_VOCAB).astype(np.uint16)[ranks]  # rank -> a random id

    streams = {}
    for label, tokens, desc in (
        ("real", real, " + ".join(sources) + f" = {distinct:,} tokens" + (
            f", TILED to {n_tokens:,} (its first {n_tokens - distinct:,} tokens repeat: more repeated n-grams "
            "than real text of that length)" if tiles > 1 else f", the first {n_tokens:,} used (not tiled)")),
        ("zipf", zipf, f"i.i.d. Zipf({NGRAM_ZIPF}) ids over V={NGRAM_VOCAB} (seed 0), not tiled"),
    ):
        path = out_dir / f"{label}-{n_tokens}.bin"
        tmp = path.with_suffix(".tmp")
        tokens.astype(np.uint16).tofile(tmp)
        os.replace(tmp, path)
        streams[label] = {"path": str(path), "tokens": n_tokens, "source": desc,
                          "distinct_tokens": distinct if label == "real" else n_tokens}
    return streams


def _vm_mib(field: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _ngram_build_child(path: str, n: int, r: int, shards: int, chunk_tokens: int, trace: bool) -> dict[str, Any]:
    """`build_ngram` over a memmapped stream into memmapped outputs (as `slm ngram` does), in this
    fresh process: timed, with the peak RSS over the build; then, with ``trace``, once more under
    tracemalloc (numpy reports its array allocations to it) for the peak of the heap arrays, with
    a digest of the outputs. The RSS peak is reset right before each build (/proc/self/clear_refs),
    as ru_maxrss would start from the parent's peak, which a child inherits across fork."""
    import hashlib
    import tracemalloc

    import numpy as np

    from slm_cli.ngram.build import build_ngram, id_dtype

    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    int(tokens.sum(dtype=np.uint64))  # page the stream in before the baseline: it is the input, not the build
    out = CACHE_DIR / "ngram" / f"out-{os.getpid()}"
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {}
    try:
        for traced in (False, True) if trace else (False,):
            ids = np.lib.format.open_memmap(out / "ids.npy", mode="w+", dtype=id_dtype(NGRAM_VOCAB),
                                            shape=(len(tokens), r))
            probs = np.lib.format.open_memmap(out / "probs.npy", mode="w+", dtype=np.float32, shape=(len(tokens), r))
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            baseline = _vm_mib("VmRSS")
            if traced:
                tracemalloc.start()
            t0 = time.perf_counter()
            _, _, stats = build_ngram(tokens, NGRAM_VOCAB, n, r, chunk_tokens=chunk_tokens, shards=shards,
                                      out=(ids, probs))
            seconds = time.perf_counter() - t0
            if traced:
                result["traced_peak_bytes"] = tracemalloc.get_traced_memory()[1]
                result["traced_seconds"] = seconds
                tracemalloc.stop()
                result["digest"] = hashlib.sha256(np.ascontiguousarray(ids).data).hexdigest()[:16] + \
                    hashlib.sha256(np.ascontiguousarray(probs).data).hexdigest()[:16]
            else:
                result.update(seconds=seconds, baseline_mib=baseline, peak_mib=_vm_mib("VmHWM"), **stats)
            del ids, probs
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return result


def _count_trie(tokens: list[int], n: int) -> dict:
    """The count trie of both `trie_build` variants: dict nodes, one level per context token; the
    node of a context (depth n−1) maps next id -> count. One walk from the root per position."""
    m = n - 1
    root: dict = {}
    for i in range(m, len(tokens)):
        node = root
        for t in tokens[i - m : i - 1]:
            child = node.get(t)
            if child is None:
                child = node[t] = {}
            node = child
        last = tokens[i - 1]
        counts = node.get(last)
        if counts is None:
            counts = node[last] = {}
        x = tokens[i]
        counts[x] = counts.get(x, 0) + 1
    return root


def _top_r_continuations(counts: dict[int, int], r: int, vocab_size: int) -> list[tuple[int, int]]:
    """The strict variant: the r best (next id, count) pairs of a context's node by scanning only its
    distinct continuations (heapq.nlargest; most frequent first, then the smaller id)."""
    import heapq

    return heapq.nlargest(r, counts.items(), key=lambda kv: (kv[1], -kv[0]))


def _top_r_vocab_scan(counts: dict[int, int], r: int, vocab_size: int) -> list[tuple[int, int]]:
    """The authors' variant: the r best (next id, count) pairs by scanning every id v in range(|V|)
    and looking its count up in the node (0 if absent); a sorted list of the best r so far, where a
    later (larger) id displaces an entry only with a larger count (ties: the smaller id first)."""
    get = counts.get
    top: list[tuple[int, int]] = []  # (id, count), most frequent first, then the smaller id
    worst = 0  # an id enters if its count beats this: the r-th best count once r are held, else 0
    for v in range(vocab_size):
        c = get(v, 0)
        if c > worst:
            j = len(top)
            while j and top[j - 1][1] < c:
                j -= 1
            top.insert(j, (v, c))
            if len(top) > r:
                top.pop()
            if len(top) == r:
                worst = top[-1][1]
    return top


TRIE_TOP_R = {"strict": _top_r_continuations, "literal": _top_r_vocab_scan}


def _trie_rows(root: dict, tokens: list[int], n: int, r: int, vocab_size: int, top_r) -> tuple[Any, Any]:
    """Per position: walk the trie to the context's node and take its top r with ``top_r``;
    probability count / context count (the sum of the node's counts). The row is computed at a
    context's first position, cached on the node's id for its later positions (the authors' scan is
    per context) and copied into the (N, r) outputs."""
    import numpy as np

    from slm_cli.ngram.build import id_dtype

    m, total = n - 1, len(tokens)
    ids = np.zeros((total, r), dtype=id_dtype(vocab_size))
    probs = np.zeros((total, r), dtype=np.float32)
    rows: dict[int, tuple] = {}
    for i in range(m, total):
        node = root
        for t in tokens[i - m : i]:
            node = node[t]
        row = rows.get(id(node))
        if row is None:
            context_count = sum(node.values())
            top = top_r(node, r, vocab_size)
            row_ids, row_probs = np.zeros(r, ids.dtype), np.zeros(r, np.float32)
            row_ids[: len(top)] = [v for v, _ in top]
            row_probs[: len(top)] = [c / context_count for _, c in top]  # float64 division, then float32
            row = rows[id(node)] = (row_ids, row_probs)
        ids[i] = row[0]
        probs[i] = row[1]
    return ids, probs


def trie_build(tokens: list[int], n: int, r: int, vocab_size: int, scan: str = "strict"):
    """A pure-Python port of the authors' count-trie builder (their release is C): the same rows as
    `build_ngram` (top r next ids by count, ties smaller id first; probability count / context count).

    1. Count (`_count_trie`): a trie of dict nodes, one level per context token; the node of a
       context (depth n−1) holds the counts of its next tokens (next id -> count).
    2. Rows (`_trie_rows`): per position, a walk to the context's node and its top r, computed once
       per context and cached. ``scan`` picks how the top r are found:
       - ``"literal"`` (the authors' design): every id v in range(|V|) is looked up in the node,
         an O(|V|) scan per context (`_top_r_vocab_scan`);
       - ``"strict"`` (faster than the authors'): only the node's distinct continuations are
         scanned, heapq.nlargest over its (next id, count) pairs (`_top_r_continuations`).
    """
    return _trie_rows(_count_trie(tokens, n), tokens, n, r, vocab_size, TRIE_TOP_R[scan])


def _ngram_trie_child(path: str, prefix: int, n: int, r: int, repeats: int) -> dict[str, Any]:
    """slm's build and both count tries on the first ``prefix`` tokens of a stream: rates and equality.
    slm's build runs ``repeats`` times before, between and after the tries, so that each trie has
    2 x ``repeats`` slm builds next to it in time (the machine's load can change over the minutes a
    trie takes). Each trie is timed end to end (list conversion, counting, rows), with the counting
    and row phases also reported apart; the 1-minute load average is read before and after each."""
    import numpy as np

    from slm_cli.ngram.build import build_ngram

    tokens = np.array(np.memmap(path, dtype=np.uint16, mode="r")[:prefix])

    def slm_builds() -> list[float]:
        secs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            build_ngram(tokens, NGRAM_VOCAB, n, r)
            secs.append(time.perf_counter() - t0)
        return secs

    ids, probs, stats = build_ngram(tokens, NGRAM_VOCAB, n, r)  # the reference rows (and a warm-up)
    slm_s = [slm_builds()]
    result: dict[str, Any] = {**stats}
    for scan, top_r in TRIE_TOP_R.items():
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        as_list = tokens.tolist()  # the list conversion is timed too
        root = _count_trie(as_list, n)
        t1 = time.perf_counter()
        t_ids, t_probs = _trie_rows(root, as_list, n, r, NGRAM_VOCAB, top_r)
        t2 = time.perf_counter()
        del root, as_list
        result[scan] = {"seconds": t2 - t0, "count_seconds": t1 - t0, "rows_seconds": t2 - t1,
                        "load_before": load, "load_after": os.getloadavg()[0],
                        "ids_equal": bool(np.array_equal(ids, t_ids)),
                        "probs_equal": bool(np.array_equal(probs, t_probs)),
                        "mismatched_rows": int(((ids != t_ids) | (probs != t_probs)).any(axis=1).sum())}
        del t_ids, t_probs
        slm_s.append(slm_builds())
        result[scan]["slm_seconds"] = slm_s[-2] + slm_s[-1]  # the builds just before and just after it
    result["slm_seconds"] = [s for batch in slm_s for s in batch]
    return result


def _run_child(name: str, **kwargs: Any) -> dict[str, Any]:
    import subprocess

    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", name, json.dumps(kwargs)],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"child {name} {kwargs} exited with {out.returncode}:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@benchmark("ngram_build", "`slm ngram` build throughput and memory (n = 3, 4, 5) vs a count-trie builder")
def ngram_build(quick: bool) -> dict[str, Any]:
    p = NGRAM_QUICK if quick else NGRAM_FULL
    r, total = p["r"], p["tokens"]
    t0 = time.perf_counter()
    streams = _ngram_streams(total)
    print(f"streams ({total:,} tokens each, V={NGRAM_VOCAB}, uint16 memmaps; {time.perf_counter() - t0:.0f}s):")
    for label, s in streams.items():
        print(f"  {label}: {s['source']}")
    configs = [(label, n, shards, chunk) for label in streams for n in p["ns"] for shards, chunk in NGRAM_SHARDINGS]
    print(f"{len(configs)} configurations x {p['rounds']} timed rounds (configurations alternate: forward, then "
          f"reversed), each build in a fresh process (round 1's also run the traced build); r={r}, float32")

    timed: dict[tuple, list[dict]] = {c: [] for c in configs}
    for rnd in range(p["rounds"]):
        t0 = time.perf_counter()
        for c in configs if rnd % 2 == 0 else configs[::-1]:
            label, n, shards, chunk = c
            # The first round's processes also run the traced build (after the timed one).
            timed[c].append(_run_child("ngram_build", path=streams[label]["path"], n=n, r=r, shards=shards,
                                       chunk_tokens=chunk, trace=rnd == 0))
        print(f"  round {rnd + 1}: {time.perf_counter() - t0:.0f}s", flush=True)
    traced = {c: timed[c][0] for c in configs}

    rows, figures = [], []
    for c in configs:
        label, n, shards, chunk = c
        secs = [t["seconds"] for t in timed[c]]
        med = statistics.median(secs)
        rss = max(t["peak_mib"] - t["baseline_mib"] for t in timed[c]) * 2**20 / total
        heap = traced[c]["traced_peak_bytes"] / total
        same = traced[c]["digest"] == traced[(label, n, *NGRAM_SHARDINGS[0])]["digest"]
        if not same:
            raise AssertionError(f"{label} n={n}: shards={shards} wrote other arrays than shards=1")
        goal = f">= 2M {'met' if total / med >= 2e6 else 'NOT met'}" if n <= 4 else ""
        rows.append([label, n, f"{shards} (chunk 2^{chunk.bit_length() - 1})", f"{traced[c]['contexts']:,}",
                     f"{traced[c]['ngrams']:,}", f"{med:.2f}", " ".join(f"{s:.2f}" for s in secs),
                     f"{total / med / 1e6:.2f}M", goal, f"{heap:.0f}", f"{rss:.0f}"])
        figures.append({"stream": label, "n": n, "r": r, "shards": shards, "chunk_tokens": chunk, "tokens": total,
                        "contexts": traced[c]["contexts"], "ngrams": traced[c]["ngrams"], "seconds": secs,
                        "seconds_median": med, "tokens_per_s": total / med,
                        "heap_peak_bytes_per_token": heap, "rss_increase_bytes_per_token": rss,
                        "same_arrays_as_shards1": same})
    print()
    print(table(["stream", "n", "shards", "contexts", "distinct n-grams", "s (median)", "s per round", "tokens/s",
                 "goal (n <= 4)", "heap B/token", "RSS B/token"], rows))
    print(f"\nheap B/token: tracemalloc peak over the build (numpy reports its array allocations to it; memmaps "
          f"are not allocations) / tokens, from a second, traced build. RSS B/token: the largest over rounds of "
          f"peak RSS during the build (VmHWM, reset before it) - RSS before it, / tokens, with the input already "
          f"paged in; it includes the output memmaps' pages (up to {r * 6} B/token at r={r}: uint16 ids + float32 "
          f"probs), which the kernel can write back and evict. shards=4 wrote byte-identical arrays to shards=1 "
          f"(sha256 checked)")

    # Same prefix, same process: slm's build vs both count tries (strict, literal), n=4.
    n, prefix = 4, p["prefix"]
    trie_rows, phase_rows, trie_figures = [], [], {}
    full_rate = {label: next(f["tokens_per_s"] for f in figures if f["stream"] == label and f["n"] == n
                             and f["shards"] == 1) for label in streams}
    for label, s in streams.items():
        t0 = time.perf_counter()
        res = _run_child("ngram_trie", path=s["path"], prefix=prefix, n=n, r=r, repeats=3)
        for scan in TRIE_TOP_R:
            if not (res[scan]["ids_equal"] and res[scan]["probs_equal"]):
                raise AssertionError(f"{label}: the {scan} count trie and build_ngram disagree on "
                                     f"{res[scan]['mismatched_rows']} of {prefix:,} rows")
        slm_rates = {scan: prefix / statistics.median(res[scan]["slm_seconds"]) for scan in TRIE_TOP_R}
        rates = {scan: prefix / res[scan]["seconds"] for scan in TRIE_TOP_R}
        ratios = {scan: slm_rates[scan] / rates[scan] for scan in TRIE_TOP_R}
        trie_rows.append([label, f"{prefix:,}", f"{res['contexts']:,}",
                          f"{rates['strict']:,.0f}", f"{slm_rates['strict']:,.0f}", f"{ratios['strict']:,.0f}x",
                          f"{rates['literal']:,.0f}", f"{slm_rates['literal']:,.0f}", f"{ratios['literal']:,.0f}x",
                          f">= 50x {'met' if ratios['literal'] >= 50 else 'NOT met'}",
                          f"{'yes' if ratios['strict'] >= 50 else 'no'}", f"{full_rate[label]:,.0f}", "yes (both)"])
        phase_rows.append([label, " ".join(f"{s:.3f}" for s in res["slm_seconds"]), *(
            f"{res[scan]['seconds']:.2f} = {res[scan]['count_seconds']:.2f} + {res[scan]['rows_seconds']:.2f}"
            f" (load {res[scan]['load_before']:.1f} -> {res[scan]['load_after']:.1f})" for scan in TRIE_TOP_R)])
        trie_figures[label] = {"prefix_tokens": prefix, "n": n, "r": r, "contexts": res["contexts"],
                               "slm_seconds": res["slm_seconds"], "slm_tokens_per_s_full": full_rate[label],
                               **{scan: {**{k: res[scan][k] for k in ("seconds", "count_seconds", "rows_seconds",
                                                                      "load_before", "load_after", "slm_seconds")},
                                         "slm_tokens_per_s": slm_rates[scan], "tokens_per_s": rates[scan],
                                         "ratio": ratios[scan], "identical": True}
                                  for scan in TRIE_TOP_R},
                               "goal_50x_vs_literal_met": ratios["literal"] >= 50,
                               "wall_s": time.perf_counter() - t0}
        print(f"  trie comparison, {label}: {time.perf_counter() - t0:.0f}s", flush=True)
    print(f"\nslm's build vs two pure-Python count tries, n={n}, r={r}, V={NGRAM_VOCAB}, on the first {prefix:,} "
          f"tokens of each stream, all in one fresh process per stream. literal = the authors' design (top r by "
          f"an O(|V|) scan of every id, once per context); strict = the same trie, top r over the node's "
          f"distinct continuations only (faster than the authors'). slm: 3 builds (in-memory outputs) before, "
          f"between and after the tries; each trie is compared with the median of the 6 next to it")
    print(table(["stream", "prefix tokens", "contexts", "strict trie tokens/s", "slm tokens/s", "slm / strict",
                 "literal trie tokens/s", "slm tokens/s", "slm / literal", "goal (vs literal)", "strict >= 50x",
                 f"slm tokens/s on {total / 1e6:.0f}M", "identical ids+probs"], trie_rows))
    print("\nseconds on the prefix (trie: end to end = list conversion + counting, then rows; 1-min load average)")
    print(table(["stream", "slm builds (before, between, after)", "strict trie = count + rows",
                 "literal trie = count + rows"], phase_rows))
    return {"quick": quick, "tokens": total, "vocab_size": NGRAM_VOCAB, "r": r, "rounds": p["rounds"],
            "streams": streams, "builds": figures, "trie": trie_figures}


# ---- target_step: step time of the n-gram targets (CoCoNTs, AllNTs) relative to CLM's ------------
TGT_FULL = {"model": "gpt2-micro", "batch_size": 4, "rounds": 3, "steps": 30, "warmup": 3}
TGT_QUICK = {"model": "gpt2-nano", "batch_size": 8, "rounds": 2, "steps": 8, "warmup": 2}
TGT_NGRAM = {"n": 4, "r": 8}
TGT_VARIANTS = [  # (label, overrides, goal for ms/step / CLM's)
    ("clm", ["target=onehot"], None),
    ("coconts", ["target=coconts", f"target.n={TGT_NGRAM['n']}", f"target.r={TGT_NGRAM['r']}"], 1.05),
    ("allnts", ["target=allnts", f"target.n={TGT_NGRAM['n']}"], None),
]


@benchmark("target_step", "step time with target=coconts / allnts vs CLM's (slm train, n-gram targets)")
def target_step(quick: bool) -> dict[str, Any]:


    from slm_cli.data.prepare import prepare
    from slm_cli.ngram.build import write_ngram
    from slm_cli.targets.allnts import AllNTs

    p = TGT_QUICK if quick else TGT_FULL
    threads = timing_setup()
    corpus, data = corpus_overrides()
    cfg = compose_train(data)
    prepared = prepare(cfg.data, cfg.paths)
    folder, meta = write_ngram(prepared, TGT_NGRAM["n"], TGT_NGRAM["r"], progress=False)  # CoCoNTs' arrays
    print(f"corpus: {corpus} -> {prepared.dir} ({prepared.meta['train_tokens']:,} train tokens, vocab "
          f"{prepared.vocab_size}); n-gram arrays {folder.name} ({'cached' if meta.get('skipped') else 'built'}: "
          f"{meta['contexts']:,} contexts, {meta['ngrams']:,} distinct {TGT_NGRAM['n']}-grams)")

    n_steps = p["warmup"] + p["steps"]
    base = [
        *data, f"model={p['model']}", f"data.batch_size={p['batch_size']}", "seed=1337",
        f"trainer.max_steps={n_steps}", f"trainer.val_check_interval={n_steps}", "trainer.limit_val_batches=1",
        f"trainer.checkpoint_every_n_steps={10**9}", "trainer.enable_progress_bar=false", "logger=csv",
    ]
    mcfg = compose_train(base).model
    M = p["batch_size"] * mcfg.block_size
    print(f"model: {p['model']} (L={mcfg.n_layer} H={mcfg.n_head} d={mcfg.n_embd} T={mcfg.block_size}), "
          f"B={p['batch_size']} -> M={M} tokens/step; torch threads {threads}; {p['rounds']} rounds x "
          f"{len(TGT_VARIANTS)} variants x {p['steps']} timed steps (+{p['warmup']} warmup), the variants taking "
          f"turns step by step")

    # AllNTs' K per step: the columns it gathers per token (the batch's widest context) and how many are real.
    widths: list[tuple[int, float]] = []
    real_targets = AllNTs.targets

    def counting_targets(self, batch):
        out = real_targets(self, batch)
        if out is not None:
            widths.append((out.ids.shape[1] - 1, float((out.probs[:, 1:] > 0).sum(1).float().mean())))
        return out

    w = p["warmup"]
    labels = [label for label, _, _ in TGT_VARIANTS]
    iters: dict[str, list[float]] = {k: [] for k in labels}
    round_med: dict[str, list[float]] = {k: [] for k in labels}
    paired: dict[str, list[float]] = {k: [] for k in labels}
    orders, k_timed = [], []
    AllNTs.targets = counting_targets
    try:
        for rnd in range(p["rounds"]):
            order = TGT_VARIANTS if rnd % 2 == 0 else TGT_VARIANTS[::-1]
            orders.append([label for label, _, _ in order])
            t0 = time.perf_counter()
            widths.clear()
            done = _interleaved_trains([(label, [*base, *o], CACHE_DIR / "runs" / "target_step" / label)
                                        for label, o, _ in order], threads)
            k_timed += widths[w:p["warmup"] + p["steps"]]  # the training steps' (validation follows)
            for label in labels:
                clock, summary = done[label]
                shutil.rmtree(Path(summary["checkpoint"]).parent, ignore_errors=True)
                if clock.threads != threads:
                    raise RuntimeError(f"torch threads changed under Lightning: {clock.threads} != {threads}")
                if summary["target"] != (label if label != "clm" else "onehot"):
                    raise RuntimeError(f"{label}: the run trained with target {summary['target']}")
                timed = clock.iters[w:]
                iters[label] += timed
                round_med[label].append(statistics.median(timed))
                paired[label] += [a / b for a, b in zip(timed, done["clm"][0].iters[w:], strict=True)]
            print(f"round {rnd + 1} ({time.perf_counter() - t0:.0f}s), order {' -> '.join(orders[-1])}: ms/step "
                  + ", ".join(f"{k} {round_med[k][-1] * 1e3:.0f}" for k in labels), flush=True)
    finally:
        AllNTs.targets = real_targets

    clm_med = statistics.median(iters["clm"])
    k_mean = statistics.mean(k for k, _ in k_timed)
    real_mean = statistics.mean(x for _, x in k_timed)
    columns = {"clm": 1, "coconts": 1 + TGT_NGRAM["r"] + 1, "allnts": 1 + k_mean}
    rows, figures = [], {}
    for label, overrides, goal in TGT_VARIANTS:
        med = statistics.median(iters[label])
        per_round = [a / b for a, b in zip(round_med[label], round_med["clm"], strict=True)]
        ratio = statistics.median(paired[label])
        verdict = "" if goal is None else f"<= {goal:.2f} {'met' if ratio <= goal else 'NOT met'}"
        rows.append([label, f"{columns[label]:.0f}", f"{med * 1e3:.0f}",
                     " ".join(f"{x * 1e3:.0f}" for x in round_med[label]), " ".join(f"{x:.3f}" for x in per_round),
                     f"{ratio:.3f}", f"{med / clm_med:.3f}", verdict])
        figures[label] = {"overrides": overrides, "target_columns_per_token": columns[label],
                          "ms_per_step": med * 1e3, "ms_per_step_per_round": [x * 1e3 for x in round_med[label]],
                          "ratio": ratio, "ratio_per_round": per_round, "ratio_pooled": med / clm_med, "goal": goal}
    figures["allnts"] |= {"K_mean": k_mean, "K_min": min(k for k, _ in k_timed), "K_max": max(k for k, _ in k_timed),
                          "real_continuations_per_token_mean": real_mean}
    print()
    print(table(["target", "(id, p) columns/token", "ms/step", "ms/step per round", "ratio per round", "ratio",
                 "pooled", "goal"], rows))
    print(f"\nms/step: median of end of batch i-1 -> end of batch i (loader with the gathered n-gram rows, hooks, "
          f"logging, training_step); ratio = median over the timed steps of step i / CLM's step i of the same "
          f"cycle; per round = the round's median / CLM's; pooled = median ms/step / CLM's ({clm_med * 1e3:.0f} ms). "
          f"columns/token: the sparse target's (id, probability) pairs per token (one-hot + soft part); AllNTs "
          f"gathers K = the batch's widest context: K mean {k_mean:.0f} (min {figures['allnts']['K_min']}, max "
          f"{figures['allnts']['K_max']}) over its {len(k_timed)} timed steps, of which {real_mean:.1f} per token "
          f"are real continuations (the rest is padding to K)")
    return {"quick": quick, "corpus": corpus, "model": p["model"], "n_layer": mcfg.n_layer, "n_head": mcfg.n_head,
            "n_embd": mcfg.n_embd, "block_size": mcfg.block_size, "batch_size": p["batch_size"],
            "vocab_size": prepared.vocab_size, "tokens_per_step": M, "ngram": {**TGT_NGRAM, "folder": str(folder)},
            "rounds": p["rounds"], "timed_steps_per_round": p["steps"], "warmup_steps": w, "orders": orders,
            "clm_ms_per_step": clm_med * 1e3, "variants": figures}


# ---- runner --------------------------------------------------------------------------------------
# ---- ddp_step: DDP on 2 CPU processes vs 1 process, same global batch -----------------------------
DDP_FULL = {"models": ("gpt2-nano", "gpt2-micro"), "global_batch": 16, "steps": 30, "rounds": 3}
DDP_QUICK = {"models": ("gpt2-nano",), "global_batch": 8, "steps": 6, "rounds": 1}


def _train_process(overrides: list[str], run_dir: Path) -> dict[str, Any]:
    """One `slm train` in its own process (DDP starts its second rank from it); its summary.json."""
    import subprocess

    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "slm_cli", "train", f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=BENCH_DIR.parent, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads((run_dir / "summary.json").read_text())


@benchmark("ddp_step", "training tokens/s: DDP on 2 CPU processes vs 1 process on the same global batch")
def ddp_step(quick: bool) -> dict[str, Any]:
    p = DDP_QUICK if quick else DDP_FULL
    corpus, data = corpus_overrides()
    g = p["global_batch"]
    variants = {
        "1 process": [f"data.batch_size={g}"],
        "ddp, 2 processes": [f"data.batch_size={g // 2}", "trainer=ddp", "trainer.accelerator=cpu",
                             "trainer.precision=32-true", "trainer.devices=2"],
    }
    rows, figures = [], []
    for model in p["models"]:
        common = [*data, f"model={model}", "selection=eslm", f"trainer.max_steps={p['steps']}",
                  f"trainer.val_check_interval={p['steps']}", "trainer.limit_val_batches=2",
                  "trainer.enable_progress_bar=false"]
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for rnd in range(p["rounds"]):  # alternate the order: ABAB... then BABA...
            order = list(variants) if rnd % 2 == 0 else list(variants)[::-1]
            for v in order:
                runs[v].append(_train_process([*common, *variants[v]], CACHE_DIR / "ddp_step" / "run"))
        rate = {v: statistics.median(r["train_tokens_per_s"] for r in runs[v]) for v in variants}
        wall = {v: statistics.median(r["wall_s"] for r in runs[v]) for v in variants}
        one, ddp = runs["1 process"][0], runs["ddp, 2 processes"][0]
        same = abs(one["val_loss"] - ddp["val_loss"])
        ratio = rate["ddp, 2 processes"] / rate["1 process"]
        for v in variants:
            rows.append([model, v, f"{rate[v]:,.0f}", " ".join(f"{r['train_tokens_per_s']:,.0f}" for r in runs[v]),
                         f"{wall[v]:.1f}", f"{ratio:.2f}" if v != "1 process" else "1", f"{same:.1e}"])
        figures.append({"model": model, "global_batch": g, "steps": p["steps"], "tokens_per_s": rate,
                        "wall_s": wall, "ddp_over_one": ratio, "val_loss_abs_diff": same,
                        "runs": {v: [{k: r[k] for k in ("train_tokens_per_s", "wall_s", "val_loss")} for r in runs[v]]
                                 for v in variants}})
    print(f"corpus: {corpus}; selection=eslm (global scope); global batch {g} windows x block_size per step; "
          f"{p['steps']} steps per run, {p['rounds']} runs per variant, alternating order")
    print(table(["model", "variant", "train tokens/s (median)", "per run", "wall s (median, incl. start-up)",
                 "ddp / 1 process", "|val_loss diff|"], rows))
    print(f"\n{os.cpu_count()} cores. 1 process: torch uses every core; DDP: Lightning "
          "gives each of the 2 processes cores / processes threads, and gradients are all-reduced over gloo every "
          "step; train tokens/s counts the time inside training steps only (slm's summary.json)")
    return {"corpus": corpus, "results": figures}


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
