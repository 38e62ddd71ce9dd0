"""early_exit: how well hierarchical ESLM's early exit, read at a sample of each window's positions,
ranks windows. Not a speed benchmark: the spread of the sampled estimate, measured on a trained model.

A model is trained with CLM (cached), then every window of held-out text (wikitext-2 test.txt) gets the early exit's mean loss
at every exit layer ℓ and over P evenly spaced positions (slm_cli/selection/instances.py) for several
P. Against the same exit read at all T positions it reports the estimate's noise (std over windows of
the difference, relative to the std of the full-position score across windows), Spearman's rank
correlation, and the share of the windows kept at window_alpha = 0.5 within micro-batches of
``group`` windows that the sampled score keeps too. Against the full model (ℓ = L, all positions) it
reports the same agreement: how well a shallow exit stands for the whole model's loss.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from benchmarks.common import (
    CACHE_DIR,
    Benchmark,
    corpus_file,
    interleaved_trains,
    prepared_corpus,
    table,
    timing_setup,
)

FULL = {"n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 512, "batch_size": 8, "steps": 400, "windows": 256,
        "group": 8, "positions": [8, 16, 32, 64, 128]}
QUICK = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 128, "batch_size": 8, "steps": 40, "windows": 64,
         "group": 8, "positions": [8, 32]}


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    for rank, i in enumerate(order):
        ranks[i] = float(rank)
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    return statistics.correlation(_ranks(a), _ranks(b))


def kept_overlap(a: list[float], b: list[float], group: int) -> float:
    """Share of the windows the top half of ``b`` keeps in each group that the top half of ``a`` keeps too."""
    from slm_cli.selection.base import keep_count

    k = keep_count(0.5, group)

    def top(values: list[float], first: int) -> set[int]:
        return set(sorted(range(first, first + group), key=lambda i: (-values[i], i))[:k])

    starts = range(0, len(a) - group + 1, group)
    return sum(len(top(a, g) & top(b, g)) for g in starts) / (k * len(starts))


def early_exit(quick: bool) -> dict[str, Any]:
    import numpy as np
    import torch

    from slm_cli.data.tokenizer import load_tokenizer
    from slm_cli.data.windows import ValWindows
    from slm_cli.model.load import load_gpt
    from slm_cli.selection.hier_eslm import HierESLM
    from slm_cli.selection.instances import score_positions, window_features

    p = QUICK if quick else FULL
    threads = timing_setup()
    corpus, data, prepared = prepared_corpus()
    model_args = [f"model.{k}={p[k]}" for k in ("n_layer", "n_head", "n_embd", "block_size")]
    run_dir = CACHE_DIR / "runs" / "early_exit" / "-".join(a.split("=")[1] for a in model_args) / f"{p['steps']}steps"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    t0 = time.perf_counter()
    if not ckpt.is_file():
        overrides = [*data, "model=gpt2-nano", *model_args, f"data.batch_size={p['batch_size']}", "seed=1337",
                     f"trainer.max_steps={p['steps']}", f"trainer.val_check_interval={p['steps']}",
                     "trainer.limit_val_batches=2", f"trainer.checkpoint_every_n_steps={10**9}",
                     "trainer.enable_progress_bar=false", "logger=csv", "optim.lr=1e-3",
                     f"optim.warmup_steps={p['steps'] // 10}"]
        interleaved_trains([("model", overrides, run_dir)], threads)
    model, _ = load_gpt(ckpt)
    T, L = p["block_size"], p["n_layer"]
    # Held-out text, enough for many windows: wikitext-2's test split, which the model never saw
    # (the corpus's own val split holds ~26 windows of 512 tokens), in the corpus's tokenizer.
    tok = load_tokenizer(str(prepared.tokenizer_path))
    held_out = corpus_file("wikitext-2/test.txt")
    ids = np.asarray(tok.encode(held_out.read_text(encoding="utf-8")).ids, dtype=np.int64)
    windows = ValWindows(ids, T, max_windows=p["windows"])
    batch = {k: torch.stack([windows[i][k] for i in range(len(windows))]) for k in ("input_ids", "labels")}
    print(f"corpus: {corpus}; model L={L} d={p['n_embd']} T={T} after {p['steps']} CLM steps "
          f"({time.perf_counter() - t0:.0f}s incl. training if not cached); {len(windows)} windows of {held_out.name}, "
          f"kept half within groups of {p['group']}; torch threads {threads}")

    def scores(layer: int, count: int | None) -> list[float]:
        strategy = HierESLM(exit_layer=layer, score_positions=count)
        return window_features(model, batch, strategy, score_positions(T, count), chunk_size=1024)["loss"].tolist()

    full_model = scores(L, None)
    rows, figures = [], {}
    for layer in range(1, L + 1):
        exact = scores(layer, None)
        spread_exact = statistics.pstdev(exact)
        for count in [*p["positions"], None]:
            s = exact if count is None else scores(layer, count)
            noise = statistics.pstdev([a - b for a, b in zip(s, exact, strict=True)]) / spread_exact
            fig = {"noise_to_spread": noise, "spearman_vs_all_positions": spearman(s, exact),
                   "kept_overlap_vs_all_positions": kept_overlap(s, exact, p["group"]),
                   "spearman_vs_full_model": spearman(s, full_model),
                   "kept_overlap_vs_full_model": kept_overlap(s, full_model, p["group"])}
            figures[f"exit{layer}_P{count or T}"] = fig
            rows.append([layer, count or T, f"{fig['noise_to_spread']:.3f}", f"{fig['spearman_vs_all_positions']:.3f}",
                         f"{fig['kept_overlap_vs_all_positions']:.3f}", f"{fig['spearman_vs_full_model']:.3f}",
                         f"{fig['kept_overlap_vs_full_model']:.3f}"])
    print(table(["exit layer", "positions P", "noise / spread", "Spearman vs all P", "kept overlap vs all P",
                 "Spearman vs full model", "kept overlap vs full model"], rows))
    return {"quick": quick, "corpus": corpus, "windows_from": f"wikitext-2 {held_out.name}", **{k: p[k] for k in ("n_layer", "n_embd", "block_size", "steps",
                                                                     "group")},
            "windows": len(windows), "figures": figures}


BENCHMARK = Benchmark("early_exit", "hierarchical ESLM's early exit: spread of the sampled window score", early_exit)
