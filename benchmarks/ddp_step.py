"""ddp_step: training tokens/s of DDP on 2 CPU processes (gloo) / 1 process, on the same global batch,
each run a separate `slm train` process."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import CACHE_DIR, REPO_DIR, Benchmark, corpus_overrides, table

DDP_FULL = {"models": ("gpt2-nano", "gpt2-micro"), "global_batch": 16, "steps": 30, "rounds": 3}
DDP_QUICK = {"models": ("gpt2-nano",), "global_batch": 8, "steps": 6, "rounds": 1}


def _train_process(overrides: list[str], run_dir: Path) -> dict[str, Any]:
    """One `slm train` in its own process (DDP starts its second rank from it); its summary.json."""
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "slm_cli", "train", f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO_DIR, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads((run_dir / "summary.json").read_text())


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



BENCHMARK = Benchmark("ddp_step", "training tokens/s: DDP on 2 CPU processes vs 1 process on the same global batch",
                      ddp_step)
