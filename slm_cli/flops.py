"""Training FLOPs, two ways: the papers' nominal accounting and what `slm` actually executes.

Convention (nanoGPT's ``estimate_mfu``; PaLM, arXiv 2204.02311, appendix B): a token costs
F = 6·N + 12·L·T·d FLOPs forward+backward, where N counts the parameters that take part in matrix
products. 6·N is 2·N forward (one multiply-add per weight) and 4·N backward (gradients w.r.t. the
input and the weight); 12·L·T·d is attention's QKᵀ and AV (2·2·T·d per layer forward, ×3 with
backward), counted without the causal halving. Forward is F/3, backward 2F/3.

Selection (RHO-1, arXiv 2404.07965; ESLM, arXiv 2505.19893) trains on |S| of M tokens:

- **nominal**, the papers' accounting: M·F/3 + |S|·2F/3 (+ extra forward work such as an online
  reference model), as if the backward were sparse.
- **realized**, what :mod:`slm_cli.loss` runs: the trunk's forward and backward stay dense (a mask
  makes no kernel sparse); the head's forward is dense; its backward runs on the selected rows
  only, costing 2 head-forwards per row when the softmax is kept, 3 when it is recomputed.

Instance-level selection (slm_cli/selection/instances.py) draws windows, scores each with an early
exit (:func:`early_exit_flops_per_window`, counted in both accountings) and runs the full forward
and backward only on the kept windows' tokens (``forward_tokens`` of :func:`step_flops`); the CLM
equivalent stays every drawn token trained densely. That is the one saving of the trunk: a dropped
window costs its early exit and nothing else.

Throughput and MFU are measured elsewhere (Lightning's ThroughputMonitor) from these figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from slm_cli.model.gpt import GPTConfig

if TYPE_CHECKING:
    import torch


def matmul_params(cfg: GPTConfig) -> int:
    """N: weights used in matmuls. Per block c_attn 3d², attn c_proj d², c_fc 4d², mlp c_proj 4d²;
    plus the tied head once (Vp·d). Not wpe (a lookup), nor biases and LayerNorm gains."""
    d = cfg.n_embd
    return 12 * cfg.n_layer * d * d + cfg.padded_vocab * d


def flops_per_token(cfg: GPTConfig) -> int:
    """F = 6·N + 12·L·T·d with T = block_size (forward + backward, per token)."""
    return 6 * matmul_params(cfg) + 12 * cfg.n_layer * cfg.block_size * cfg.n_embd


def head_flops_per_token(cfg: GPTConfig) -> int:
    """Forward of the LM head matmul, 2·d·Vp; its backward is twice that."""
    return 2 * cfg.n_embd * cfg.padded_vocab


@dataclass
class StepFlops:
    nominal: float  # papers' convention: dense forward, backward on the selected tokens only
    realized: float  # what slm executes: dense trunk, head backward on the selected rows only
    clm: float  # the same step trained on every token


def early_exit_flops_per_window(cfg: GPTConfig, exit_layer: int, positions: int) -> int:
    """Forward FLOPs of scoring one window by an early exit: the first ``exit_layer`` blocks on all
    T = block_size positions (attention needs every earlier position), 2·12·d² + 4·T·d per token and
    block (the forward third of :func:`flops_per_token`), then the tied head on ``positions`` of
    them, 2·d·Vp each (the final LayerNorm is not a matmul)."""
    d, T = cfg.n_embd, cfg.block_size
    return T * exit_layer * (24 * d * d + 4 * T * d) + positions * head_flops_per_token(cfg)


def step_flops(
    cfg: GPTConfig,
    tokens: int,
    selected: int,
    *,
    forward_tokens: int | None = None,
    keep_probs: bool = True,
    extra_forward: float = 0.0,
    scoring_pass: bool = False,
    early_exit: float = 0.0,
) -> StepFlops:
    """FLOPs of one step that draws ``tokens`` tokens, runs ``forward_tokens`` of them (all by
    default) through the full forward and backward, and trains ``selected`` of those.

    ``extra_forward`` is any additional forward work (an online reference model: 2·N_ref per token;
    a teacher's forward), counted in both nominal and realized. ``keep_probs`` matches
    :func:`slm_cli.loss.token_stats`: head backward costs 2 head-forwards per selected row when
    the softmax is kept, 3 when the logits are recomputed. With every token selected and
    ``keep_probs``, realized equals clm exactly.

    ``early_exit``: the step's instance-selection scoring (:func:`early_exit_flops_per_window` per
    drawn window), a forward the method itself runs, so counted in both accountings.
    ``scoring_pass``: the step ran the model forward once more, without gradients, to score the
    whole global batch before selecting (trainer.selection_scope=global_batch with gradient
    accumulation, slm_cli/selection/scope.py). That is a cost of executing on split batches, not of
    the method, so it counts in realized only.
    """
    F = flops_per_token(cfg)
    head = head_flops_per_token(cfg)
    head_backward = 2 if keep_probs else 3
    trained = tokens if forward_tokens is None else forward_tokens
    return StepFlops(
        nominal=trained * F / 3 + selected * 2 * F / 3 + extra_forward + early_exit,
        realized=trained * (F - 3 * head)  # trunk forward + backward, dense
        + trained * head  # head forward (token_stats), dense
        + selected * head_backward * head  # head backward on the selected rows
        + extra_forward
        + early_exit
        + (trained * F / 3 if scoring_pass else 0.0),
        clm=float(tokens * F),
    )


def saved_frac(flops: float, clm: float) -> float:
    """Fraction of CLM's FLOPs saved: 1 − flops/clm (0 when clm is 0)."""
    return 0.0 if clm == 0 else 1.0 - flops / clm


def hf_matmul_params(model: torch.nn.Module) -> int:
    """N of a Hugging Face model: every ≥2-D parameter outside embedding lookups, plus the output
    head once (tied to the input embedding or not)."""
    import torch

    seen: set[int] = set()
    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        for p in module.parameters(recurse=False):
            if p.dim() >= 2 and id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
    head = model.get_output_embeddings().weight
    return n + (head.numel() if id(head) not in seen else 0)


def hf_forward_flops_per_token(model: torch.nn.Module, context: int) -> float:
    """The forward analogue of :func:`flops_per_token` for a Hugging Face model: 2·N + 4·L·T·d
    (QKᵀ and AV) with T = ``context``."""
    config = model.config
    return float(2 * hf_matmul_params(model) + 4 * config.num_hidden_layers * context * config.hidden_size)
