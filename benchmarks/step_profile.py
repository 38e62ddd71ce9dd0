"""step_profile: where a training step's time goes, by class of work (torch.profiler over `slm train`),
next to each class's share of the FLOPs, for CLM and ESLM at keep 0.6 and 0.4 on selection_step's
model. It explains selection_step's time/FLOPs figure: time follows the FLOPs saved only as far as
the work that shrinks with k is as large a share of the step's time as of its FLOPs."""

from __future__ import annotations

import shutil
import statistics
import time
from typing import Any

from benchmarks.common import (
    CACHE_DIR,
    Benchmark,
    compose_train,
    prepared_corpus,
    table,
    timing_setup,
)
from benchmarks.selection_step import SEL_FULL, SEL_QUICK

VARIANTS = [("clm", ["selection=clm"], 1.0), ("eslm", ["selection=eslm"], 0.6),
            ("eslm alpha=0.6", ["selection=eslm", "selection.alpha=0.6"], 0.4)]
MATMULS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")
# slm_cli/loss.py names the head's forward and backward with these profiler labels.
HEAD_FORWARD, HEAD_BACKWARD = "slm.head.forward", "slm.head.backward"
# The classes, in the order of the table, and whether a selection shrinks them.
CLASSES = {
    "head forward: logits matmul": "no",
    "head forward: log-softmax, gathers": "no",
    "head backward: gradient matmuls": "yes",
    "head backward: exp of kept rows, target": "yes",
    "trunk: matmuls": "no",
    "trunk: attention": "no",
    "trunk: other ops": "no",
    "AdamW, gradient clip": "no",
    "not in an op: Python, Lightning, loader": "no",
}
SHRINKING = [c for c, shrinks in CLASSES.items() if shrinks == "yes"]


def _region(event: Any) -> str | None:
    """The head region (forward or backward label) an op ran in, if any."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in (HEAD_FORWARD, HEAD_BACKWARD):
            return parent.name
        parent = parent.cpu_parent
    return None


def classify(event: Any) -> str | None:
    """The class of one profiled op (None: not a leaf op to count, e.g. a label or a wrapper)."""
    name = event.name
    if name in (HEAD_FORWARD, HEAD_BACKWARD) or not name.startswith(("aten::", "Optimizer.")):
        return None
    region = _region(event)
    matmul = name in MATMULS
    if region == HEAD_FORWARD:
        return "head forward: logits matmul" if matmul else "head forward: log-softmax, gathers"
    if region == HEAD_BACKWARD:
        return "head backward: gradient matmuls" if matmul else "head backward: exp of kept rows, target"
    if "adam" in name.lower() or "vector_norm" in name or "Optimizer." in name:
        return "AdamW, gradient clip"
    if matmul:
        return "trunk: matmuls"
    if "scaled_dot_product" in name:
        return "trunk: attention"
    return "trunk: other ops"


def _profile_run(label: str, overrides: list[str], n_steps: int, warmup: int) -> dict[str, Any]:
    """One `train()` run; torch.profiler over the steps after ``warmup``; ms per step by class."""
    import lightning as L
    from torch.profiler import ProfilerActivity, profile

    from slm_cli.run import train

    class Profiler(L.Callback):
        def __init__(self) -> None:
            self.prof: Any = None
            self.walls: list[float] = []
            self._t0 = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == warmup:
                self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
                self.prof.__enter__()
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx >= warmup:
                self.walls.append(time.perf_counter() - self._t0)
            if batch_idx == n_steps - 1:
                self.prof.__exit__(None, None, None)

    run_dir = CACHE_DIR / "runs" / "step_profile" / label.replace(" ", "_").replace("=", "")
    cfg = compose_train([*overrides, f"paths.output_dir={run_dir}", f"paths.log_dir={run_dir.parent}"])
    shutil.rmtree(run_dir, ignore_errors=True)
    cb = Profiler()
    train(cfg, callbacks=[cb])
    shutil.rmtree(run_dir, ignore_errors=True)
    steps = len(cb.walls)
    ms = dict.fromkeys(CLASSES, 0.0)
    allocated = dict.fromkeys(CLASSES, 0.0)  # MB of new tensors per step: fresh memory to fault in on a CPU
    for event in cb.prof.events():
        cls = classify(event)
        if cls is not None:
            ms[cls] += event.self_cpu_time_total / 1e3 / steps
            allocated[cls] += max(0, event.self_cpu_memory_usage) / 2**20 / steps
    wall = statistics.mean(cb.walls) * 1e3
    ms["not in an op: Python, Lightning, loader"] = max(0.0, wall - sum(ms.values()))
    return {"ms_per_step": wall, "ms_by_class": ms, "mb_allocated_by_class": allocated}


def step_profile(quick: bool) -> dict[str, Any]:
    from slm_cli.flops import flops_per_token, head_flops_per_token
    from slm_cli.model.gpt import GPTConfig

    p = SEL_QUICK if quick else SEL_FULL
    threads = timing_setup()
    corpus, data, _ = prepared_corpus()
    rounds, warmup, profiled = (2, 1, 2) if quick else (3, 2, 4)
    n_steps = warmup + profiled
    model = [f"model.{k}={p[k]}" for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")]
    base = [*data, "model=gpt2-nano", "model.name=bench-profile", *model, f"data.batch_size={p['batch_size']}",
            f"trainer.accumulate_grad_batches={p['accumulate']}", "seed=1337", f"trainer.max_steps={n_steps}", f"trainer.val_check_interval={n_steps}",
            "trainer.limit_val_batches=1", f"trainer.checkpoint_every_n_steps={10**9}",
            "trainer.enable_progress_bar=false", "logger=csv"]
    gpt = GPTConfig(**{k: p[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")})
    F, head = flops_per_token(gpt), head_flops_per_token(gpt)
    # FLOPs shares of a CLM step (slm_cli/flops.py): head forward 1, its backward 2 head-forwards.
    flops_share = {"head forward: logits matmul": head / F, "head backward: gradient matmuls": 2 * head / F,
                   "trunk: matmuls": (F - 3 * head) / F}
    print(f"corpus: {corpus}; model: L={p['n_layer']} d={p['n_embd']} T={p['block_size']}, head vocab "
          f"{gpt.padded_vocab}, {p['accumulate']} micro-batches of B={p['batch_size']} per step; torch threads {threads}; {rounds} rounds, one run per variant "
          f"per round (order rotated), torch.profiler over {profiled} steps after {warmup} warmup; medians over rounds")
    per_round: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in VARIANTS}
    for r in range(rounds):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        for label, overrides, _ in order:
            per_round[label].append(_profile_run(label, [*base, *overrides], n_steps, warmup))
        print(f"round {r + 1}: " + ", ".join(f"{label} {per_round[label][-1]['ms_per_step']:.0f} ms/step"
                                            for label, _, _ in VARIANTS), flush=True)
    runs = {label: {"ms_per_step": statistics.median(x["ms_per_step"] for x in got),
                    "ms_by_class": {c: statistics.median(x["ms_by_class"][c] for x in got) for c in CLASSES},
                    "mb_allocated_by_class": {c: statistics.median(x["mb_allocated_by_class"][c] for x in got)
                                              for c in CLASSES},
                    "rounds": got}
            for label, got in per_round.items()}

    clm = runs["clm"]
    rows = []
    for cls, shrinks in CLASSES.items():
        share = flops_share.get(cls)
        rows.append([cls, shrinks, "" if share is None else f"{share:.3f}",
                     *(f"{runs[label]['ms_by_class'][cls]:.0f}" for label, _, _ in VARIANTS),
                     f"{clm['ms_by_class'][cls] / clm['ms_per_step']:.3f}",
                     f"{clm['mb_allocated_by_class'][cls]:.0f}"])
    rows.append(["step (wall)", "", "1.000", *(f"{runs[label]['ms_per_step']:.0f}" for label, _, _ in VARIANTS),
                 "1.000", f"{sum(clm['mb_allocated_by_class'].values()):.0f}"])
    print()
    print(table(["class", "shrinks with k", "FLOPs share (CLM)", *(f"{label} ms" for label, _, _ in VARIANTS),
                 "time share (CLM)", "MB allocated (CLM)"], rows))
    # Only the head's backward shrinks with k (slm_cli/flops.py). If it shrank exactly in proportion
    # and nothing else changed, time saved / realised FLOPs saved would be its share of CLM's time
    # over its share of CLM's FLOPs: the ceiling for selection_step's time/FLOPs figure.
    shrinking = sum(clm["ms_by_class"][c] for c in SHRINKING) / clm["ms_per_step"]
    ceiling = shrinking / flops_share["head backward: gradient matmuls"]
    print(f"\nwhat shrinks with k (the head's backward): {flops_share['head backward: gradient matmuls']:.3f} of "
          f"CLM's FLOPs, {shrinking:.3f} of its time -> time saved / realised FLOPs saved can reach {ceiling:.2f}")
    print("ms: self CPU time of the ops per step, median over rounds (the profiler adds a little to each op); "
          "'not in an op' = the step's wall time minus the ops'; MB allocated: new tensors per step (each fresh "
          "block is faulted in, zeroed, on its first write on a CPU)")
    return {"quick": quick, **{k: p[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size",
                                                 "accumulate", "vocab_size")},
            "rounds": rounds, "profiled_steps": profiled, "warmup_steps": warmup, "flops_share": flops_share,
            "runs": runs, "shrinking_time_share": shrinking, "time_over_flops_ceiling": ceiling}


BENCHMARK = Benchmark("step_profile", "where a step's time goes (torch.profiler), next to its FLOPs", step_profile)
