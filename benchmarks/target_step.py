"""target_step: the training step time with the n-gram targets (CoCoNTs, AllNTs) / CLM's, the variants
taking turns step by step; goal: CoCoNTs <= 1.05x CLM (AllNTs has none: it shows what the compact form
avoids)."""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import (
    CACHE_DIR,
    Benchmark,
    PairedSteps,
    compose_train,
    interleaved_trains,
    prepared_corpus,
    table,
    timing_setup,
)

TGT_FULL = {"model": "gpt2-micro", "batch_size": 4, "rounds": 3, "steps": 30, "warmup": 3}
TGT_QUICK = {"model": "gpt2-nano", "batch_size": 8, "rounds": 2, "steps": 8, "warmup": 2}
TGT_NGRAM = {"n": 4, "r": 8}
TGT_VARIANTS = [  # (label, overrides, goal for ms/step / CLM's)
    ("clm", ["target=onehot"], None),
    ("coconts", ["target=coconts", f"target.n={TGT_NGRAM['n']}", f"target.r={TGT_NGRAM['r']}"], 1.05),
    ("allnts", ["target=allnts", f"target.n={TGT_NGRAM['n']}"], None),
]


def allnts_widths() -> Callable[[], list[tuple[int, float]]]:
    """interleaved_trains' probe, run in each training process: AllNTs' K per step (the columns it
    gathers per token, the batch's widest context, and how many of them are real); empty for the
    other targets."""
    from slm_cli.target.allnts import AllNTs

    widths: list[tuple[int, float]] = []
    real_targets = AllNTs.targets

    def counting_targets(self, batch):
        out = real_targets(self, batch)
        if out is not None:
            widths.append((out.ids.shape[1] - 1, float((out.probs[:, 1:] > 0).sum(1).float().mean())))
        return out

    AllNTs.targets = counting_targets
    return lambda: widths


def target_step(quick: bool) -> dict[str, Any]:
    from slm_cli.ngram.build import write_ngram

    p = TGT_QUICK if quick else TGT_FULL
    threads = timing_setup()
    corpus, data, prepared = prepared_corpus()
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

    w = p["warmup"]
    labels = [label for label, _, _ in TGT_VARIANTS]
    steps = PairedSteps(labels, baseline="clm", warmup=w)
    orders, k_timed = [], []
    for rnd in range(p["rounds"]):
        order = TGT_VARIANTS if rnd % 2 == 0 else TGT_VARIANTS[::-1]
        orders.append([label for label, _, _ in order])
        t0 = time.perf_counter()
        done = interleaved_trains([(label, [*base, *o], CACHE_DIR / "runs" / "target_step" / label)
                                   for label, o, _ in order], threads, probe=allnts_widths)
        k_timed += done["allnts"].probed[w:p["warmup"] + p["steps"]]  # the training steps' (validation follows)
        for label in labels:
            run = done[label]
            shutil.rmtree(Path(run.summary["checkpoint"]).parent, ignore_errors=True)
            if run.summary["target"] != (label if label != "clm" else "onehot"):
                raise RuntimeError(f"{label}: the run trained with target {run.summary['target']}")
        steps.add_round(done)
        print(f"round {rnd + 1} ({time.perf_counter() - t0:.0f}s), order {' -> '.join(orders[-1])}: ms/step "
              + ", ".join(f"{k} {steps.round_medians[k][-1] * 1e3:.0f}" for k in labels), flush=True)

    clm_med = steps.median("clm")
    k_mean = statistics.mean(k for k, _ in k_timed)
    real_mean = statistics.mean(x for _, x in k_timed)
    columns = {"clm": 1, "coconts": 1 + TGT_NGRAM["r"] + 1, "allnts": 1 + k_mean}
    rows, figures = [], {}
    for label, overrides, goal in TGT_VARIANTS:
        med, per_round, ratio = steps.median(label), steps.per_round(label), steps.ratio(label)
        verdict = "" if goal is None else f"<= {goal:.2f} {'met' if ratio <= goal else 'NOT met'}"
        rows.append([label, f"{columns[label]:.0f}", f"{med * 1e3:.0f}",
                     " ".join(f"{x * 1e3:.0f}" for x in steps.round_medians[label]),
                     " ".join(f"{x:.3f}" for x in per_round), f"{ratio:.3f}", f"{steps.pooled(label):.3f}", verdict])
        figures[label] = {"overrides": overrides, "target_columns_per_token": columns[label],
                          "ms_per_step": med * 1e3, "ms_per_step_per_round": [x * 1e3 for x in steps.round_medians[label]],
                          "ratio": ratio, "ratio_per_round": per_round, "ratio_pooled": steps.pooled(label), "goal": goal}
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



BENCHMARK = Benchmark("target_step",
                      "step time with target=coconts / allnts vs CLM's (slm train, n-gram targets)", target_step)
