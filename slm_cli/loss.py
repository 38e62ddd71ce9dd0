"""Per-token losses through the tied LM head without building B×T×V logits more than once.

Inputs are flattened: ``hidden`` (M, d) final hidden states, ``weight`` (Vp, d) the tied head
(padded rows are just extra classes that never appear as targets), ``labels`` (M,).

Two steps, with the selection strategy (elsewhere) in between:

1. :func:`token_stats` runs the head forward once, chunk by chunk and without a graph, and returns
   per-token loss, log-sum-exp, optionally entropy, and (by default) the softmax rows.
2. :func:`weighted_loss` returns Σ_j w_j·CE(y_j, p_j) with a custom backward that touches only
   rows with w_j ≠ 0.

Cost model (docs/methods.md, "Realising the head savings"), in units of the head's forward
matmul M·d·Vp, with keep ratio k = |{j : w_j ≠ 0}| / M:

- plain autograd on a masked loss: 3 (forward; grad-input and grad-weight over all M rows);
- ``keep_probs=False`` ("recompute"): 1 + 3k (forward here; in backward, logits of the kept rows
  again, then the two gradient matmuls on those rows);
- ``keep_probs=True`` ("store"): 1 + 2k, at the price of one (M, Vp) float32 buffer. For CLM
  (k = 1) this is exactly plain autograd's 3.

The trunk's backward stays dense whatever k is (masking makes no kernel sparse); only the head's
backward shrinks. :mod:`slm_cli.flops` counts FLOPs with the same model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor


@dataclass
class TokenStats:
    loss: Tensor  # (M,) float32, −log p(label), detached
    lse: Tensor  # (M,) float32, log Σ_v exp(logit_v)
    entropy: Tensor | None = None  # (M,) float32, −Σ_v p_v log p_v
    # (M, Vp) float32 softmax, kept for weighted_loss's backward. weighted_loss takes it over: its
    # backward overwrites the selected rows in place (no (k·M, Vp) copy when every row is kept),
    # so weighted_loss sets this field to None and nothing can read a consumed buffer.
    probs: Tensor | None = None


@dataclass
class SparseTargets:
    """A target distribution with K entries per row: y_j = Σ_k probs[j, k] · e_{ids[j, k]}.

    Entries with probability 0 contribute nothing; duplicate ids add up; rows need not sum to 1
    (the gradient is correct for any nonnegative y). The one-hot target is K = 1 with probability
    1. Used for n-gram soft targets (CoCoNTs / AllNTs, arXiv 2407.02819), where a mixture
    (1−λ)·e_{x_j} + λ·y_j is one more column.
    """

    ids: Tensor  # (M, K) long
    probs: Tensor  # (M, K) float


def _row_chunks(n: int, chunk_size: int) -> range:
    return range(0, n, max(1, chunk_size))


def _fill_chunk(make_logits: Callable[[], Tensor], labels: Tensor, rows: slice, loss: Tensor, lse: Tensor,
                ent: Tensor | None, probs: Tensor | None) -> None:
    """Per-row statistics of one float32 (chunk, Vp) block of logits, written at ``rows``. The
    block is made here (not passed in) so that it can be freed before ``p`` is allocated."""
    logits = make_logits()
    label_logit = logits.gather(1, labels[rows, None]).squeeze(1)
    # One fused log-softmax pass gives the loss, the log-sum-exp and (exponentiated) p.
    logp = torch.log_softmax(logits, dim=-1)
    del logits  # free this chunk's logits before p (or the next chunk) allocates its own
    label_logp = logp.gather(1, labels[rows, None]).squeeze(1)
    loss[rows] = -label_logp
    lse[rows] = label_logit - label_logp  # log-sum-exp = logit_y − log p_y
    if ent is not None or probs is not None:
        # exp(log p) is written straight into the kept buffer: no extra (chunk, Vp) copy.
        p = torch.exp(logp, out=probs[rows]) if probs is not None else logp.exp()
        if ent is not None:
            # H = −Σ_v p_v·log p_v as a batched mat-vec: no (chunk, Vp) product tensor, and
            # several times faster on CPU than linalg.vecdot over rows this long.
            ent[rows] = -torch.matmul(p.unsqueeze(1), logp.unsqueeze(2)).view(-1)


@torch.no_grad()
def token_stats(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    chunk_size: int = 1024,
    entropy: bool = False,
    keep_probs: bool = True,
) -> TokenStats:
    """One forward pass of the head, chunked over rows: per-token CE, lse, entropy, softmax.

    Logits are computed in ``hidden``'s dtype (or the autocast dtype), softmax statistics in
    float32. The only (M, Vp) tensor is the ``probs`` buffer when ``keep_probs``; otherwise peak
    memory is one (chunk_size, Vp) block.
    """
    M = hidden.shape[0]
    w = weight.to(hidden.dtype)
    loss = hidden.new_empty(M, dtype=torch.float32)
    lse = torch.empty_like(loss)
    ent = torch.empty_like(loss) if entropy else None
    probs = hidden.new_empty(M, weight.shape[0], dtype=torch.float32) if keep_probs else None
    for s in _row_chunks(M, chunk_size):
        rows = slice(s, s + chunk_size)
        _fill_chunk(lambda rows=rows: (hidden[rows] @ w.T).float(), labels, rows, loss, lse, ent, probs)
    return TokenStats(loss=loss, lse=lse, entropy=ent, probs=probs)


@torch.no_grad()
def logits_stats(logits: Tensor, labels: Tensor, *, entropy: bool = True) -> TokenStats:
    """The statistics of :func:`token_stats` from ready (M, V) logits (a Hugging Face model's
    output), in float32 row chunks of about 64 MB so that the float32 copy stays bounded."""
    M = logits.shape[0]
    chunk_size = max(1, (1 << 24) // logits.shape[1])
    loss = torch.empty(M, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(loss)
    ent = torch.empty_like(loss) if entropy else None
    for s in _row_chunks(M, chunk_size):
        rows = slice(s, s + chunk_size)
        _fill_chunk(lambda rows=rows: logits[rows].float(), labels, rows, loss, lse, ent, None)
    return TokenStats(loss=loss, lse=lse, entropy=ent)


def perplexity(loss: float) -> float:
    """exp(mean loss), capped so that a diverged loss reports a huge number, not an overflow."""
    return math.exp(min(loss, 700.0))


# Rows × target entries gathered at once by the soft-target loss, per row of loss.chunk_size: the
# gathered W rows take at most SOFT_BLOCK · chunk_size · d floats, whatever the target's width K.
SOFT_BLOCK = 16


def _soft_ce(hidden: Tensor, weight: Tensor, lse: Tensor, rows: Tensor, target_ids: Tensor,
             target_probs: Tensor, chunk_size: int) -> Tensor:
    """CE(y_j, p_j) = Σ_k y_jk·(lse_j − h_j·W_{id_jk}) for the given rows.

    Gathering the K target rows of W costs M·K·d, not M·d·Vp; blocks of (rows, entries) keep the
    gathered (rows, entries, d) tensor bounded by SOFT_BLOCK · chunk_size · d floats, so a wide
    target (AllNTs: K = the most continuations of any context in the batch) costs more time, not
    unbounded memory."""
    n, width = rows.numel(), target_ids.shape[1]
    budget = SOFT_BLOCK * chunk_size
    per_row = min(width, budget)  # entries per block
    block_rows = max(1, min(chunk_size, budget // per_row))
    ce = hidden.new_zeros(n, dtype=torch.float32)
    for s in _row_chunks(n, block_rows):
        r = rows[s : s + block_rows]
        h = hidden[r].float()
        for k in range(0, width, per_row):
            ids, y = target_ids[r, k : k + per_row], target_probs[r, k : k + per_row].float()
            logit_t = torch.einsum("md,mkd->mk", h, weight[ids].float())
            ce[s : s + block_rows] += (y * (lse[r, None] - logit_t)).sum(-1)
    return ce


def _compact_rows(buffer: Tensor, rows: Tensor) -> bool:
    """Move ``buffer[rows]`` (rows ascending) to ``buffer[:len(rows)]`` in place, on a CPU; returns
    whether it did.

    Gathering the kept softmax rows with ``buffer[rows]`` allocates a fresh (k·M, Vp) tensor, and on
    a CPU the page faults of that allocation, not the copy, dominate: the gather ran at ~1.4 GB/s,
    a fifth of the head's backward (profiled at k = 0.6, M = 2048, Vp = 50304). Copying within the
    buffer, whose pages are mapped already, moves the same bytes at memcpy speed. Rows only move
    towards the front, so no row is overwritten before it moves; numpy's slice assignment handles
    the overlap within a run (torch's in-storage copy_ was ~100x slower per row). On a GPU the
    caching allocator has no such cost and the gather stays."""
    if buffer.device.type != "cpu" or not buffer.is_contiguous():
        return False
    array = buffer.numpy()
    r = rows.cpu().numpy()
    if len(r) == 0:
        return True
    breaks = np.flatnonzero(np.diff(r) != 1) + 1
    dst = 0
    for run in np.split(r, breaks):
        src, n = int(run[0]), len(run)
        if src != dst:
            array[dst : dst + n] = array[src : src + n]
        dst += n
    return True


class _WeightedHeadCE(torch.autograd.Function):
    """Σ_j w_j·CE(y_j, softmax(W h_j)) with a backward restricted to rows with w_j ≠ 0.

    d/dlogit_j of CE(y_j, p_j) = p_j·(Σ_v y_jv) − y_j, so with G_j = w_j·(p_j·Σy_j − y_j):
    grad_hidden_j = G_j W and grad_W = Σ_j G_jᵀ h_j. Rows with w_j = 0 have G_j = 0 and are skipped.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        weights: Tensor,
        loss: Tensor,
        lse: Tensor,
        probs: Tensor | None,
        target_ids: Tensor | None,
        target_probs: Tensor | None,
        chunk_size: int,
    ) -> Tensor:
        rows = weights.nonzero().squeeze(1)
        if target_ids is None:
            value = (weights[rows] * loss[rows]).sum()  # the one-hot CE is already in stats.loss
        else:
            value = (weights[rows] * _soft_ce(hidden, weight, lse, rows, target_ids, target_probs, chunk_size)).sum()
        ctx.save_for_backward(hidden, weight, labels, weights, rows, probs, target_ids, target_probs)
        ctx.chunk_size = chunk_size
        # Replay the caller's autocast state in backward (what torch.amp.custom_bwd does), so that
        # the backward matmuls run in the same precision as plain autograd would use.
        ctx.device_type = hidden.device.type
        ctx.autocast = torch.is_autocast_enabled(ctx.device_type)
        ctx.autocast_dtype = torch.get_autocast_dtype(ctx.device_type)
        return value

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, labels, weights, rows, probs, target_ids, target_probs = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        w = weight.to(hidden.dtype)
        # When every row is kept (CLM), slices give views instead of gathered copies.
        all_rows = rows.numel() == hidden.shape[0]
        compacted = probs is not None and not all_rows and _compact_rows(probs, rows)
        with torch.autocast(ctx.device_type, dtype=ctx.autocast_dtype, enabled=ctx.autocast):
            for s in _row_chunks(rows.numel(), ctx.chunk_size):
                r = slice(s, s + ctx.chunk_size) if all_rows else rows[s : s + ctx.chunk_size]
                h = hidden[r]
                scale = weights[r].float() * grad_out.float()
                if target_ids is None:
                    coef = scale
                else:
                    y = target_probs[r].float()
                    coef = scale * y.sum(-1)
                # store mode consumes the softmax kept by token_stats, in place (weighted_loss
                # took it over from the caller's TokenStats); recompute mode pays one more
                # (k·M, d) × (d, Vp) matmul here.
                if probs is not None:
                    # The kept rows sit at the front of the buffer once compacted: a view, not a gather.
                    G = (probs[s : s + coef.shape[0]] if compacted else probs[r]).mul_(coef[:, None])
                else:
                    G = torch.softmax((h @ w.T).float(), dim=-1).mul_(coef[:, None])
                if target_ids is None:
                    G[torch.arange(G.shape[0], device=G.device), labels[r]] -= scale
                else:
                    G.scatter_add_(1, target_ids[r], -scale[:, None] * y)  # duplicate ids add up
                G = G.to(hidden.dtype)
                if grad_h is not None:
                    grad_h[r] = (G @ w).to(hidden.dtype)
                if grad_w is not None:
                    grad_w += (G.T @ h).float()
                del G  # before the next chunk allocates its own
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None, None


def weighted_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    weights: Tensor,
    stats: TokenStats,
    *,
    targets: SparseTargets | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """Scalar Σ_j w_j·CE(y_j, p_j), differentiable w.r.t. ``hidden`` and ``weight``.

    ``y_j`` is one-hot on ``labels`` unless ``targets`` is given. ``weights`` (M,) are nonnegative
    constants already normalised by the caller (1/M for CLM; 1/|S| on a selection S, 0 elsewhere;
    divided by the global count across ranks/micro-batches if need be). ``stats`` must come from
    :func:`token_stats` on the same ``hidden``/``weight``; with ``stats.probs`` the backward reuses
    it (store mode), otherwise it recomputes the kept rows' logits (recompute mode). The full
    logits are never recomputed. The kept softmax is consumed by the backward: ``stats.probs`` is
    None on return (the other fields stay valid).
    """
    probs, stats.probs = stats.probs, None
    return _WeightedHeadCE.apply(
        hidden,
        weight,
        labels,
        weights,
        stats.loss,
        stats.lse,
        probs,
        None if targets is None else targets.ids,
        None if targets is None else targets.probs,
        chunk_size,
    )
