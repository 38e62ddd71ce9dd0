"""selection_step: the step time of each selection strategy / CLM's on a flagship-shaped step (GPT-2's
vocabulary on a small trunk, so the LM head is most of the step; 12 windows per micro-batch and several
micro-batches per step, as the *_gpt2 recipes), the variants taking turns step by step. Goals: token
selection below CLM's step time with time saved >= 85% of the realised FLOPs saved; hierarchical ESLM
keeping half the windows at most 0.65 x CLM's step time."""

from __future__ import annotations

import contextlib
import io
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.common import (
    CACHE_DIR,
    Benchmark,
    PairedSteps,
    compose,
    interleaved_trains,
    prepared_corpus,
    table,
    timing_setup,
)

if TYPE_CHECKING:
    from slm_cli.data.prepared import PreparedData

# GPT-2's vocabulary (50304 = 50257 padded to a multiple of 64) on a small trunk, so the LM head is
# most of the step: what token selection can save is the head's backward on the dropped rows.
# 12 windows per micro-batch, as the *_gpt2 recipes (data.batch_size=12), so the head runs several
# loss.chunk_size chunks per micro-batch as it does there: 3072 rows here, 12288 in the recipes. With
# one chunk per micro-batch (batch_size 4) the costs paid once per micro-batch (the tied weight's
# (V, d) gradients) and one ragged chunk of kept rows weigh several times what they do in a recipe's
# step (docs/benchmarks.md, selection_step).
SEL_FULL = {"n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 256, "batch_size": 12, "accumulate": 4,
            "vocab_size": 50304, "rounds": 4, "steps": 6, "warmup": 2, "optional": True}
SEL_QUICK = {"n_layer": 2, "n_head": 2, "n_embd": 128, "block_size": 128, "batch_size": 2, "accumulate": 3,
             "vocab_size": 50304, "rounds": 2, "steps": 3, "warmup": 1, "optional": False}
EFFICIENCY_GOAL = 0.85  # time saved / realised FLOPs saved

# The rho1 reference: only its per-token losses matter here (read from disk during training), so it is
# gpt2-nano cut to L=2, d=64 and trained for a few dozen steps, which keeps `slm score` under ~30 s.
# Its context is the training window's: precomputed scores are read on `slm score`'s grid of
# context-sized windows, and training windows are those windows.
REF_MODEL = ["model=gpt2-nano", "model.n_layer=2", "model.n_head=2", "model.n_embd=64"]
REF_STEPS = 40


def ref_name(block_size: int) -> str:
    """The score folder ref-<name>/ beside the benchmark corpus's train.bin, one per context."""
    return f"bench-ref-T{block_size}"


@dataclass
class Variant:
    label: str
    overrides: list[str]
    keep: float  # share of the drawn tokens trained on
    goal: float | None  # goal for step time / CLM's step time (None: no goal, for comparison)
    efficiency: bool = True  # the time/FLOPs goal applies (token selection)


def _selection_variants(ref_ckpt: Path, optional: bool, block_size: int) -> list[Variant]:
    rho1 = ["selection=rho1", f"data.tokenizer={ref_ckpt}", f"selection.reference.name={ref_name(block_size)}"]
    variants = [
        Variant("clm", ["selection=clm"], 1.0, None),
        Variant("eslm", ["selection=eslm"], 0.6, 1.00),
        Variant("eslm score=entropy", ["selection=eslm", "selection.score=entropy"], 0.6, 1.00),
        Variant("rho1", rho1, 0.6, 1.00),
        Variant("eslm alpha=0.6", ["selection=eslm", "selection.alpha=0.6"], 0.4, 0.90),
        Variant("rho1 ratio=0.4", [*rho1, "selection.ratio=0.4"], 0.4, 0.90),
        # half the windows by the early exit (a quarter of the blocks), ESLM keep 0.6 inside them
        Variant("hier_eslm", ["selection=hier_eslm"], 0.5 * 0.6, 0.65, efficiency=False),
    ]
    if optional:  # for the cost model: the head's backward at 1 + 3k instead of 1 + 2k
        variants.append(Variant("eslm alpha=0.6 recompute",
                                ["selection=eslm", "selection.alpha=0.6", "loss.keep_probs=false"], 0.4, None))
    return variants


def _reference(data: list[str], prepared: PreparedData, threads: int, block_size: int) -> Path:
    """A tiny gpt2-nano reference trained with CLM on the benchmark corpus (same BPE, so the data
    folder is shared), scored over train.bin with `slm score`'s code path. Cached in .cache/."""
    from slm_cli.errors import SlmError
    from slm_cli.reference.scores import load_scores_and_meta, run_score

    run_dir = CACHE_DIR / "runs" / "selection_step" / f"reference-L2-d64-T{block_size}-{REF_STEPS}steps"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if ckpt.is_file():
        with contextlib.suppress(SlmError):
            load_scores_and_meta(prepared, name=ref_name(block_size))
            print(f"reference: {ckpt} and its scores in {prepared.dir / f'ref-{ref_name(block_size)}'} (cached)")
            return ckpt
    t0 = time.perf_counter()
    overrides = [*data, *REF_MODEL, f"model.block_size={block_size}", "data.batch_size=16", "seed=1337",
                 f"trainer.max_steps={REF_STEPS}",
                 f"trainer.val_check_interval={REF_STEPS}", "trainer.limit_val_batches=2",
                 f"trainer.checkpoint_every_n_steps={10**9}", "trainer.enable_progress_bar=false", "logger=csv"]
    interleaved_trains([("reference", overrides, run_dir)], threads)
    train_s = time.perf_counter() - t0
    # context = the reference's block size, stride = context: the grid training windows start on.
    with contextlib.redirect_stderr(io.StringIO()):  # `slm score`'s progress bar (errors still raise)
        result = run_score(compose("score", [*data, f"ckpt_path={ckpt}", f"name={ref_name(block_size)}", "batch_size=16"]))
    print(f"reference: gpt2-nano L=2 d=64, {REF_STEPS} CLM steps ({train_s:.0f}s) -> {ckpt}; scored {result['tokens']:,} "
          f"tokens at {result['tokens_per_s']:,.0f} tokens/s")
    return ckpt


def selection_step(quick: bool) -> dict[str, Any]:
    from slm_cli.selection.base import keep_count

    p = SEL_QUICK if quick else SEL_FULL
    threads = timing_setup()
    corpus, data, prepared = prepared_corpus()
    ref_ckpt = _reference(data, prepared, threads, p["block_size"])

    n_steps = p["warmup"] + p["steps"]
    model = [f"model.{k}={p[k]}" for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")]
    base = [
        *data, "model=gpt2-nano", "model.name=bench-selection", *model, f"data.batch_size={p['batch_size']}",
        f"trainer.accumulate_grad_batches={p['accumulate']}",
        "seed=1337", f"trainer.max_steps={n_steps}", f"trainer.val_check_interval={n_steps}",
        "trainer.limit_val_batches=1", f"trainer.checkpoint_every_n_steps={10**9}",
        "trainer.enable_progress_bar=false", "logger=csv",
    ]
    micro_tokens = p["batch_size"] * p["block_size"]
    M = micro_tokens * p["accumulate"]
    variants = _selection_variants(ref_ckpt, p["optional"], p["block_size"])
    print(f"corpus: {corpus} -> {prepared.dir} ({prepared.meta['train_tokens']:,} train tokens, tokenizer vocab "
          f"{prepared.vocab_size}); model: L={p['n_layer']} H={p['n_head']} d={p['n_embd']} T={p['block_size']}, "
          f"head vocab {p['vocab_size']}, {p['accumulate']} micro-batches of B={p['batch_size']} -> M={M} tokens/step; "
          f"torch threads {threads}; "
          f"{p['rounds']} rounds x {len(variants)} variants x {p['steps']} timed steps (+{p['warmup']} warmup)")

    w = p["warmup"]
    steps = PairedSteps([v.label for v in variants], baseline="clm", warmup=w)
    summaries: dict[str, dict[str, Any]] = {}
    orders = []
    for r in range(p["rounds"]):
        # Alternate the order within the cycle: forward, then reversed (then rotated...).
        shift = (r // 2) * len(variants) // max(1, p["rounds"])
        order = variants[shift:] + variants[:shift]
        order = order[::-1] if r % 2 else order
        orders.append([v.label for v in order])
        t0 = time.perf_counter()
        done = interleaved_trains([(v.label, [*base, *v.overrides],
                                    CACHE_DIR / "runs" / "selection_step" / v.label.replace(" ", "_").replace("=", ""))
                                   for v in order], threads)
        for v in order:
            summary = done[v.label].summary
            shutil.rmtree(Path(summary["checkpoint"]).parent, ignore_errors=True)  # ~200 MB each, not needed
            summaries[v.label] = summary
        steps.add_round(done)
        print(f"round {r + 1} ({time.perf_counter() - t0:.0f}s), cycle order: {' -> '.join(orders[-1])}")
        print("  ms/step (median): " + ", ".join(f"{v.label} {steps.round_medians[v.label][-1] * 1e3:.0f}"
                                                 for v in variants), flush=True)

    clm_med = steps.median("clm")
    rows, figures = [], {}
    for v in variants:
        med, ratio, pooled = steps.median(v.label), steps.ratio(v.label), steps.pooled(v.label)
        per_round = steps.per_round(v.label)
        s = summaries[v.label]
        frac = s["selected_tokens"] / s["train_tokens"]
        if v.efficiency:  # token selection: ceil(k·m) of each micro-batch's m tokens
            expected = keep_count(v.keep, micro_tokens) / micro_tokens
            if abs(frac - expected) > 1e-12:
                raise AssertionError(f"{v.label}: selected_tokens/train_tokens = {frac} but ceil(k*m)/m = {expected}")
        else:
            expected = frac
        goals = [] if v.goal is None else [f"<= {v.goal:.2f} {'met' if ratio <= v.goal else 'NOT met'}"]
        # How much of the realised FLOPs saving shows up as time (goal: >= 0.85 for the selective variants).
        realised = s["flops_saved_frac_realized"]
        efficiency = (1 - ratio) / realised if realised > 0 else float("nan")
        if v.keep < 1 and v.efficiency:
            goals.append(f"time/FLOPs {efficiency:.2f} {'met' if efficiency >= EFFICIENCY_GOAL else 'NOT met'}")
        rows.append([v.label, f"{v.keep:.2f}", f"{frac:.4f}", f"{med * 1e3:.0f}",
                     " ".join(f"{x:.3f}" for x in per_round), f"{ratio:.3f}", f"{pooled:.3f}", "; ".join(goals),
                     f"{1 - ratio:+.3f}", f"{s['flops_saved_frac_realized']:.3f}", f"{s['flops_saved_frac_nominal']:.3f}"])
        figures[v.label] = {
            "overrides": v.overrides, "keep": v.keep, "selected_frac": frac, "expected_selected_frac": expected,
            "ms_per_step": med * 1e3, "ms_per_step_per_round": [x * 1e3 for x in steps.round_medians[v.label]],
            "ratio": ratio, "ratio_per_round": per_round, "ratio_median_of_rounds": statistics.median(per_round),
            "ratio_pooled": pooled,
            "goal": v.goal, "time_saved_frac": 1 - ratio, "time_over_flops_saved": efficiency,
            "efficiency_goal": EFFICIENCY_GOAL if v.keep < 1 and v.efficiency else None,
            "flops_saved_frac_realized": s["flops_saved_frac_realized"],
            "flops_saved_frac_nominal": s["flops_saved_frac_nominal"],
        }
    print()
    print(table(["variant", "k", "selected/M", "ms/step", "ratio per round", "ratio", "pooled", "goal", "time saved",
                 "realised saved", "nominal saved"], rows))
    print(f"\nms/step: median over all rounds of end of batch i-1 -> end of batch i (loader, hooks, logging, "
          f"training_step); ratio per round = the round's median ms/step / CLM's; ratio = median over all timed "
          f"steps of step i / CLM's step i of the same cycle; pooled = median ms/step / CLM's ({clm_med * 1e3:.0f} "
          f"ms); time saved = 1 - ratio; "
          f"realised/nominal saved: summary.json flops_saved_frac_realized / flops_saved_frac_nominal; "
          f"selected/M = ceil(k*m)/m of each micro-batch's m tokens checked for every token-selection variant")
    return {
        "quick": quick, "corpus": corpus, **{k: p[k] for k in ("n_layer", "n_head", "n_embd", "block_size",
                                                                "batch_size", "accumulate", "vocab_size")},
        "tokenizer_vocab": prepared.vocab_size, "tokens_per_step": M, "rounds": p["rounds"],
        "timed_steps_per_round": p["steps"], "warmup_steps": w, "orders": orders, "reference": str(ref_ckpt),
        "clm_ms_per_step": clm_med * 1e3, "variants": figures,
    }


BENCHMARK = Benchmark("selection_step",
                      "step time of each selection strategy / CLM's (slm train, GPT-2 vocabulary)", selection_step)
