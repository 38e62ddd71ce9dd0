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
import math
import os
import platform
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
# The shared wikitext-2 copy; when it is missing the benchmarks fall back to slm's stdlib corpus.
WIKITEXT2_VALID = Path("/work/shared/data/wikitext-2/valid.txt")


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
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


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


def _step_clock():
    """A Lightning callback: timestamps at the start and end of every training batch, and the loss.

    An iteration is timed end to end (end of batch i-1 -> end of batch i), so it includes the loader
    fetch and every hook and logger call Lightning makes per step, not only training_step.
    """
    import lightning as L
    import torch

    class StepClock(L.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.ends: list[float] = []
            self.losses: list[float] = []
            self.threads = 0

        def on_train_start(self, trainer, pl_module) -> None:
            self.threads = torch.get_num_threads()
            self.ends.append(time.perf_counter())  # t0 of the first iteration

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.starts.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.ends.append(time.perf_counter())
            self.losses.append(float(trainer.callback_metrics["train/loss"]))

    return StepClock()


def _slm_run(overrides: list[str], run_dir: Path) -> tuple[list[float], list[float], list[float], int]:
    """`slm_cli.train.train(cfg)`, the real path, with a timing callback added to its Trainer.

    Returns per-iteration times, per-training_step times (batch start -> end), losses, threads.
    """
    import slm_cli.train as slm_train

    cfg = compose_train([*overrides, f"paths.output_dir={run_dir}", f"paths.log_dir={run_dir.parent}"])
    clock = _step_clock()
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
    iters = [b - a for a, b in zip(clock.ends, clock.ends[1:], strict=False)]
    steps = [b - a for a, b in zip(clock.starts, clock.ends[1:], strict=True)]
    return iters, steps, clock.losses, clock.threads


def _plain_run(overrides: list[str]) -> tuple[list[float], list[float]]:
    """The minimal nanoGPT loop on the same model, init, windows, optimizer and schedule."""
    import torch
    import torch.nn.functional as F

    from slm_cli import optim
    from slm_cli.data.prepare import prepare
    from slm_cli.data.windows import StepSampler, TrainWindows
    from slm_cli.model.gpt import GPT
    from slm_cli.train import model_config

    cfg = compose_train(overrides)
    prepared = prepare(cfg.data, cfg.paths)
    gpt = model_config(cfg, prepared)
    torch.manual_seed(cfg.seed)  # what L.seed_everything does for the CPU generator
    model = GPT(gpt)
    model.train()
    opt, sched = optim.build(model.param_groups(cfg.optim.weight_decay), cfg.optim,
                             cfg.optim.decay_steps or cfg.trainer.max_steps)
    windows = TrainWindows(prepared.tokens("train"), gpt.block_size, cfg.seed)
    sampler = iter(StepSampler(cfg.data.batch_size))
    params = list(model.parameters())
    times, losses = [], []
    t_prev = time.perf_counter()
    for _ in range(cfg.trainer.max_steps):
        batch = windows[next(sampler)]
        x, y = batch["input_ids"], batch["labels"]
        logits = model.logits(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.item())
        t = time.perf_counter()
        times.append(t - t_prev)
        t_prev = t
    return times, losses


@benchmark("clm_step", "slm CLM training step (slm train, Lightning) vs a minimal plain-PyTorch loop")
def clm_step(quick: bool) -> dict[str, Any]:
    import logging

    import torch

    p = CLM_QUICK if quick else CLM_FULL
    threads = os.cpu_count() or 1
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
    rows, per_round = [], []
    loss_pairs = []
    for r in range(p["rounds"]):
        run_dir = CACHE_DIR / "runs" / "clm_step" / f"round{r}"
        order = ("slm", "plain") if r % 2 == 0 else ("plain", "slm")  # alternate: drift hits both sides
        for side in order:
            if side == "slm":
                it, st, slm_loss, lightning_threads = _slm_run(overrides, run_dir)
            else:
                pit, plain_loss = _plain_run(overrides)
        if lightning_threads != threads:
            raise RuntimeError(f"torch threads changed under Lightning: {lightning_threads} != {threads}")
        it, st, pit = it[w:], st[w:], pit[w:]
        slm_iters += it
        slm_steps += st
        plain_iters += pit
        s_med, p_med = statistics.median(it), statistics.median(pit)
        ratio = p_med / s_med
        per_round.append(ratio)
        loss_pairs.append((slm_loss[-1], plain_loss[-1], slm_loss[0], plain_loss[0]))
        rows.append([f"round {r + 1} ({order[0]} first)", f"{s_med * 1e3:.0f}", f"{statistics.median(st) * 1e3:.0f}",
                     f"{p_med * 1e3:.0f}", f"{ratio:.3f}"])

    s_med, p_med = statistics.median(slm_iters), statistics.median(plain_iters)
    step_med = statistics.median(slm_steps)
    ratio = p_med / s_med
    rows.append(["all rounds (median)", f"{s_med * 1e3:.0f}", f"{step_med * 1e3:.0f}", f"{p_med * 1e3:.0f}",
                 f"**{ratio:.3f}**"])
    print()
    print(table(["", "slm ms/iter", "slm ms/training_step", "plain ms/iter", "tokens/s slm / plain"], rows))
    print(f"\ntokens/s: slm {tokens_per_step / s_med:,.0f}, plain {tokens_per_step / p_med:,.0f}; "
          f"ratio {ratio:.3f} (goal >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'}); "
          f"per round {', '.join(f'{x:.3f}' for x in per_round)}")
    print("slm ms/iter: end of batch i-1 -> end of batch i (loader + Lightning hooks + logging + step); "
          "slm ms/training_step: on_train_batch_start -> on_train_batch_end")

    # Same work: the same init and windows give (nearly) the same loss curve on both sides.
    first_diff = max(abs(a - b) for _, _, a, b in loss_pairs)
    last_diff = max(abs(a - b) for a, b, _, _ in loss_pairs)
    s_last, p_last = loss_pairs[-1][0], loss_pairs[-1][1]
    print(f"training loss after {n_steps} steps: slm {s_last:.4f}, plain {p_last:.4f} "
          f"(max |diff| over rounds: step 1 {first_diff:.2e}, step {n_steps} {last_diff:.2e})")
    if first_diff > 1e-4 or last_diff > 2e-2 * max(1.0, abs(p_last)):
        raise AssertionError(f"slm and the plain loop disagree on the training loss (step 1: {first_diff:.2e}, "
                             f"step {n_steps}: {last_diff:.2e}): they are not doing the same work")

    return {
        "quick": quick, "corpus": corpus, "model": p["model"], "n_layer": cfg.model.n_layer,
        "n_head": cfg.model.n_head, "n_embd": cfg.model.n_embd, "block_size": cfg.model.block_size,
        "batch_size": cfg.data.batch_size, "vocab_size": prepared.vocab_size, "tokens_per_step": tokens_per_step,
        "rounds": p["rounds"], "timed_steps_per_round": p["steps"], "warmup_steps": w,
        "slm_ms_per_iter": s_med * 1e3, "slm_ms_per_training_step": step_med * 1e3, "plain_ms_per_iter": p_med * 1e3,
        "slm_tokens_per_s": tokens_per_step / s_med, "plain_tokens_per_s": tokens_per_step / p_med,
        "ratio": ratio, "ratio_per_round": per_round, "goal": 0.95,
        "loss_slm": s_last, "loss_plain": p_last, "loss_max_abs_diff_first": first_diff,
        "loss_max_abs_diff_last": last_diff,
    }


# ---- runner --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
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
