"""A run's plan before it starts (`slm train dry_run=true`): sizes, budget, FLOPs, memory, ETA.

The FLOPs are those a real run logs: the strategy itself says what it keeps
(:meth:`Selection.keep_fraction`, :meth:`Selection.plan_keep_fractions`), the scope says how many
tokens one selection ranks and whether a scoring pass runs (slm_cli/selection/scope.py), and the
step's FLOPs come from the function the training step calls (:func:`slm_cli.accounting.step_cost`).
The realised figures lead; the papers' nominal accounting stands beside them.

The memory estimate is the one every real run checks first (slm_cli/run.py), so that a configuration
that cannot fit stops in one line instead of growing for minutes. It counts, per device:

- weights, gradients and AdamW's two moments: 4 + 4 + 8 bytes per parameter (float32 master
  copies, also under bf16-mixed), divided by the devices under FSDP;
- activations kept for the backward, per token run forward and per layer: ≈ 17·d values
  (LayerNorm inputs and outputs, q/k/v, attention output, the MLP's 4d input and GELU output), in
  the autocast dtype under mixed precision; no T×T attention matrix, since CPU's fused attention
  and GPUs' flash attention keep none;
- the loss path: the kept log-softmax (`loss.keep_probs`: tokens × Vp float32) and two chunks
  (2 · chunk_size × Vp float32): the backward's block of kept rows (store mode) or of recomputed
  logits (recompute mode), and the low-precision copies of a chunk under mixed precision;
- the process itself (CPU: its resident memory once torch and Lightning are loaded, measured;
  GPU: a CUDA context allowance).

The ETA divides the realised FLOPs by a rate: on a CPU the rate of a float32 matmul measured
now (an upper bound on what training reaches), on GPUs each model's peak dense bf16 FLOP/s at an
assumed 40% model FLOPs utilisation.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from slm_cli import flops
from slm_cli.accounting import step_cost
from slm_cli.budget import Budget
from slm_cli.errors import SlmError
from slm_cli.model.gpt import GPTConfig
from slm_cli.selection.base import Selection, keep_count
from slm_cli.selection.clm import CLM
from slm_cli.selection.scope import MicroBatch, Scope, build_scope
from slm_cli.target.base import Target
from slm_cli.text import duration

GIB = 2**30
# Peak dense bf16 (fp16 where there is no bf16) tensor FLOP/s, from the vendors' data sheets.
GPU_PEAK = {"H100 SXM": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12, "A10G": 125e12,
            "V100 (fp16)": 125e12, "T4 (fp16)": 65e12}
ASSUMED_MFU = 0.4
CUDA_CONTEXT = 0.5 * GIB


def _rss_bytes() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 0.0


def device_memory(accelerator: str) -> tuple[float, str]:
    """(bytes, what) of one device: a GPU's memory, or this machine's RAM."""
    if accelerator in ("gpu", "cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return float(props.total_memory), props.name
    pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return float(pages * size), "RAM"


def memory(gpt: GPTConfig, params: int, budget: Budget, cfg: DictConfig, window_keep: float = 1.0) -> dict[str, float]:
    """Bytes per device, by what holds them (see the module docstring). ``window_keep``: the share
    of each micro-batch's windows that runs forward and backward (instance-level selection)."""
    t = cfg.trainer
    on_gpu = t.accelerator in ("gpu", "cuda")
    sharded = isinstance(t.strategy, DictConfig) and "FSDP" in str(t.strategy.get("_target_", ""))
    share = budget.world_size if sharded else 1
    tokens = keep_count(window_keep, budget.micro_batch) * gpt.block_size
    act_bytes = 2 if str(t.precision).startswith(("bf16", "16")) else 4
    per_token_layer = 17 * gpt.n_embd
    vp = gpt.padded_vocab
    chunk = min(int(cfg.loss.chunk_size), tokens)
    return {
        "weights": 4.0 * params / share,
        "gradients": 4.0 * params / share,
        "optimizer": 8.0 * params / share,
        "activations": float(tokens * gpt.n_layer * per_token_layer * act_bytes + tokens * gpt.n_embd * 4),
        "keep_probs": float(tokens * vp * 4) if cfg.loss.keep_probs else 0.0,
        "logits_chunk": float(2 * chunk * vp * 4),
        "runtime": CUDA_CONTEXT if on_gpu else _rss_bytes(),
    }


def cpu_flops_rate(seconds: float = 0.3) -> float:
    """FLOP/s of a float32 1024² matmul on this machine's CPU threads, measured now."""
    a = torch.randn(1024, 1024)
    a @ a  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ a
        n += 1
    return 2 * 1024**3 * n / (time.perf_counter() - t0)


def vocab_size(cfg: DictConfig) -> tuple[int, str]:
    """The vocabulary without preparing anything: the prepared folder's if it exists, else the
    configured one."""
    import json

    from slm_cli.data.sources import source_name

    if cfg.model.vocab_size is not None:
        return int(cfg.model.vocab_size), "model.vocab_size"
    meta = Path(cfg.paths.data_dir) / source_name(cfg.data) / "meta.json"
    try:  # a damaged meta.json is reported by the data code itself, which explains the fix
        return int(json.loads(meta.read_text())["vocab_size"]), str(meta.parent)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if cfg.data.tokenizer == "bpe":
        return int(cfg.data.vocab_size), "data.vocab_size (not prepared yet)"
    return 50257, "GPT-2's (the tokenizer is not loaded by a dry run)"


def step_counts(selection: Selection, scope: Scope, gpt: GPTConfig, budget: Budget, keep: float) -> tuple[int, int, int]:
    """(tokens drawn, run forward, trained on) per step, by the rules the training step applies:
    whole windows kept per micro-batch, then tokens per selection unit of the scope."""
    micro_batches = budget.accumulate * budget.world_size
    windows = keep_count(selection.window_keep_fraction(), budget.micro_batch)
    forward = windows * gpt.block_size
    return budget.tokens_per_step, forward * micro_batches, scope.selected_per_step(forward, micro_batches, keep)


def step_figures(cfg: DictConfig, gpt: GPTConfig, budget: Budget, selection: Selection, scope_name: str,
                 target: Target, keep: float) -> dict[str, Any]:
    """One step's tokens and FLOPs with ``selection`` at keep fraction ``keep``."""
    scope = build_scope(scope_name, selection, budget.accumulate)
    tokens, forward, selected = step_counts(selection, scope, gpt, budget, keep)
    step = step_cost(gpt, selection, target, scope, keep_probs=bool(cfg.loss.keep_probs), tokens=tokens,
                     forward_tokens=forward, selected=selected)
    return {"keep_fraction": keep, "forward_tokens_per_step": forward, "selected_tokens_per_step": selected,
            "flops_per_step_realized": step.realized, "flops_per_step_nominal": step.nominal,
            "flops_per_step_clm": step.clm, "scoring_pass": scope.scoring_pass(), "selection_scope": scope.name}


def totals(per_step: dict[str, Any], warm: dict[str, Any], warm_steps: int, steps: int) -> dict[str, float]:
    """A run's tokens and FLOPs: ``warm_steps`` CLM steps (trainer.selection_start_step), then the strategy's."""
    out = {}
    for kind in ("forward_tokens", "selected_tokens"):
        out[kind] = warm[f"{kind}_per_step"] * warm_steps + per_step[f"{kind}_per_step"] * (steps - warm_steps)
    for kind in ("realized", "nominal", "clm"):
        key = f"flops_per_step_{kind}"
        out[f"flops_{kind}"] = warm[key] * warm_steps + per_step[key] * (steps - warm_steps)
    out["flops_saved_frac_realized"] = flops.saved_frac(out["flops_realized"], out["flops_clm"])
    out["flops_saved_frac_nominal"] = flops.saved_frac(out["flops_nominal"], out["flops_clm"])
    return out


def make(cfg: DictConfig, gpt: GPTConfig, budget: Budget, selection: Selection, target: Target) -> dict[str, Any]:
    """The plan of a run: a flat dict of figures (what `dry_run=true` prints and `plan_out=` writes).
    Per-step figures are the strategy's; totals include a warm start's CLM steps."""
    from slm_cli.model.gpt import GPT

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        params = GPT(gpt).num_params(exclude_position_embeddings=False)
    selection.configure(gpt)
    steps = budget.max_steps
    warm_steps = min(int(cfg.trainer.selection_start_step), steps)
    warm = step_figures(cfg, gpt, budget, CLM(), MicroBatch.name, target, 1.0)  # the module's warm-up phase
    at = {label: step_figures(cfg, gpt, budget, selection, cfg.trainer.selection_scope, target, keep)
          for label, keep in selection.plan_keep_fractions().items()}
    head = next(iter(at.values()))  # the headline: the first of the strategy's plan fractions
    mem = memory(gpt, params, budget, cfg, selection.window_keep_fraction())
    return {
        "params": params, "block_size": gpt.block_size, "vocab_size": gpt.vocab_size,
        "micro_batch": budget.micro_batch, "accumulate": budget.accumulate, "world_size": budget.world_size,
        "global_batch": budget.global_batch, "tokens_per_step": budget.tokens_per_step, "steps": steps,
        "total_tokens": budget.total_tokens, "selection": selection.name, "selection_start_step": warm_steps,
        "window_keep_fraction": selection.window_keep_fraction(), **head, **totals(head, warm, warm_steps, steps),
        "plan_at": {label: {**fig, **totals(fig, warm, warm_steps, steps)} for label, fig in at.items()}
        if len(at) > 1 else {},
        "memory": mem, "memory_total": sum(mem.values()),
    }


def check_fits(plan: dict[str, Any], cfg: DictConfig) -> None:
    """Stop before a run whose estimate exceeds the device's memory (trainer.check_memory=false
    overrides)."""
    if not cfg.trainer.get("check_memory", True):
        return
    capacity, what = device_memory(cfg.trainer.accelerator)
    need = plan["memory_total"]
    if need > capacity:
        biggest = max(plan["memory"], key=plan["memory"].get)
        raise SlmError(f"this run needs about {need / GIB:.1f} GiB per device ({biggest} "
                       f"{plan['memory'][biggest] / GIB:.1f} GiB) but the {what} holds {capacity / GIB:.1f} GiB: "
                       "lower data.batch_size (raise trainer.accumulate_grad_batches to keep the global batch), "
                       "model.block_size, or set loss.keep_probs=false; trainer.check_memory=false runs anyway")


def describe(plan: dict[str, Any], cfg: DictConfig) -> str:
    """The plan as a short table, realised FLOPs first, with ETAs."""
    m = plan["memory"]
    windows = "" if plan["window_keep_fraction"] == 1 else \
        f"; {plan['window_keep_fraction']:.0%} of each micro-batch's windows run forward and backward"
    lines = [
        f"model       {cfg.model.name}: {plan['params'] / 1e6:.2f}M parameters, context {plan['block_size']}, "
        f"vocabulary {plan['vocab_size']}",
        f"batch       {plan['global_batch']} windows per step = {plan['micro_batch']} × {plan['accumulate']} "
        f"micro-batches × {plan['world_size']} device(s): {plan['tokens_per_step']:,} tokens per step",
        f"budget      {plan['steps']:,} steps, {plan['total_tokens']:,} tokens; selection {plan['selection']} "
        f"({plan['selection_scope']}) trains on {plan['selected_tokens_per_step'] / plan['tokens_per_step']:.0%} of them"
        + windows,
        f"FLOPs       realised {plan['flops_realized']:.3e} ({_saved(plan['flops_saved_frac_realized'])} CLM's "
        f"{plan['flops_clm']:.3e}); nominal, the papers' accounting, {plan['flops_nominal']:.3e} "
        f"({_saved(plan['flops_saved_frac_nominal'])}); per step {plan['flops_per_step_realized']:.3e} realised"
        + ("; with a scoring pass per step (global_batch scope)" if plan["scoring_pass"] else ""),
    ]
    if plan["selection_start_step"]:
        lines.append(f"            (CLM for the first {plan['selection_start_step']:,} steps: "
                     "trainer.selection_start_step)")
    for label, fig in plan["plan_at"].items():
        lines.append(f"  at {label:<8} keep {fig['keep_fraction']:.0%}: realised {fig['flops_realized']:.3e} "
                     f"({_saved(fig['flops_saved_frac_realized'])} CLM)")
    lines.append("memory      per device " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in m.items())
                 + f" = {plan['memory_total'] / GIB:.2f} GiB")
    rate = cpu_flops_rate()
    etas = [f"this CPU {duration(plan['flops_realized'] / rate)} (at its measured matmul rate "
            f"{rate / 1e9:.0f} GFLOP/s)"]
    etas += [f"{name} {duration(plan['flops_realized'] / (peak * ASSUMED_MFU * plan['world_size']))}"
             for name, peak in GPU_PEAK.items()]
    lines.append(f"ETA         on {plan['world_size']} device(s): " + "; ".join(etas)
                 + f" (GPUs at {ASSUMED_MFU:.0%} MFU)")
    return "\n".join(lines)


def _saved(frac: float) -> str:
    return f"{frac:.1%} below" if frac >= 0 else f"{-frac:.1%} above"
