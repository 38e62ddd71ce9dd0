"""A run's plan before it starts (`slm train dry_run=true`): sizes, budget, FLOPs, memory, ETA.

The memory estimate is the one every real run checks first (train.py), so that a configuration
that cannot fit stops in one line instead of growing for minutes. It counts, per device:

- weights, gradients and AdamW's two moments: 4 + 4 + 8 bytes per parameter (float32 master
  copies, also under bf16-mixed), divided by the devices under FSDP;
- activations kept for the backward, per token and layer: ≈ 17·d float32 values (LayerNorm
  inputs and outputs, q/k/v, attention output, the MLP's 4d input and GELU output), plus the
  attention matrix (heads · T per token) where the attention kernel materialises it; in the
  autocast dtype under mixed precision;
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

import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from slm_cli import flops
from slm_cli.budget import Budget
from slm_cli.errors import SlmError
from slm_cli.model.gpt import GPTConfig
from slm_cli.text import duration

GIB = 2**30
# Peak dense bf16 (fp16 where there is no bf16) tensor FLOP/s, from the vendors' data sheets.
GPU_PEAK = {"H100 SXM": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12, "A10G": 125e12,
            "V100 (fp16)": 125e12, "T4 (fp16)": 65e12}
ASSUMED_MFU = 0.4
CUDA_CONTEXT = 0.5 * GIB


def keep_fraction(selection: DictConfig) -> float:
    """The share of tokens a strategy trains on, from its config (Ada-ESLM: its starting α)."""
    if "ratio" in selection:
        return float(selection.ratio)
    if "alpha" in selection:
        return 1.0 - float(selection.alpha)
    return 1.0


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


def memory(gpt: GPTConfig, params: int, budget: Budget, cfg: DictConfig) -> dict[str, float]:
    """Bytes per device, by what holds them (see the module docstring)."""
    t = cfg.trainer
    on_gpu = t.accelerator in ("gpu", "cuda")
    sharded = isinstance(t.strategy, DictConfig) and "FSDP" in str(t.strategy.get("_target_", ""))
    share = budget.world_size if sharded else 1
    tokens = budget.micro_batch * gpt.block_size
    act_bytes = 2 if str(t.precision).startswith(("bf16", "16")) else 4
    # CPU's fused attention and GPUs' flash attention keep no T×T matrix.
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


def make(cfg: DictConfig, gpt: GPTConfig, budget: Budget) -> dict[str, Any]:
    """The plan of a run: a flat dict of figures (what `dry_run=true` prints)."""
    from slm_cli.model.gpt import GPT

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        params = GPT(gpt).num_params(exclude_position_embeddings=False)
    keep = keep_fraction(cfg.selection)
    tokens = budget.tokens_per_step
    step = flops.step_flops(gpt, tokens, math.ceil(keep * tokens), keep_probs=bool(cfg.loss.keep_probs),
                            scoring_pass=budget.accumulate > 1 and cfg.selection.scope == "global"
                            and keep < 1.0)
    mem = memory(gpt, params, budget, cfg)
    return {
        "params": params, "block_size": gpt.block_size, "vocab_size": gpt.vocab_size,
        "micro_batch": budget.micro_batch, "accumulate": budget.accumulate, "world_size": budget.world_size,
        "global_batch": budget.global_batch, "tokens_per_step": tokens, "steps": budget.max_steps,
        "total_tokens": budget.total_tokens, "keep_fraction": keep,
        "flops_per_step_nominal": step.nominal, "flops_per_step_realized": step.realized,
        "flops_nominal": step.nominal * budget.max_steps, "flops_realized": step.realized * budget.max_steps,
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
    """The plan as a short table, with ETAs."""
    m = plan["memory"]
    lines = [
        f"model       {cfg.model.name}: {plan['params'] / 1e6:.2f}M parameters, context {plan['block_size']}, "
        f"vocabulary {plan['vocab_size']}",
        f"batch       {plan['global_batch']} windows per step = {plan['micro_batch']} × {plan['accumulate']} "
        f"micro-batches × {plan['world_size']} device(s): {plan['tokens_per_step']:,} tokens per step",
        f"budget      {plan['steps']:,} steps, {plan['total_tokens']:,} tokens; selection {cfg.selection.name} "
        f"trains on {plan['keep_fraction']:.0%} of them",
        f"FLOPs       per step {plan['flops_per_step_nominal']:.3e} nominal, {plan['flops_per_step_realized']:.3e} "
        f"realised; in total {plan['flops_nominal']:.3e} nominal, {plan['flops_realized']:.3e} realised",
        "memory      per device " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in m.items())
        + f" = {plan['memory_total'] / GIB:.2f} GiB",
    ]
    rate = cpu_flops_rate()
    etas = [f"this CPU {duration(plan['flops_realized'] / rate)} (at its measured matmul rate "
            f"{rate / 1e9:.0f} GFLOP/s)"]
    etas += [f"{name} {duration(plan['flops_realized'] / (peak * ASSUMED_MFU * plan['world_size']))}"
             for name, peak in GPU_PEAK.items()]
    lines.append(f"ETA         on {plan['world_size']} device(s): " + "; ".join(etas)
                 + f" (GPUs at {ASSUMED_MFU:.0%} MFU)")
    return "\n".join(lines)

