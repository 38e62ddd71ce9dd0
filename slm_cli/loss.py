"""Per-token losses through the tied LM head without building B×T×V logits more than once.

Inputs are flattened: ``hidden`` (M, d) final hidden states, ``weight`` (Vp, d) the tied head
(padded rows are just extra classes that never appear as targets), ``labels`` (M,).

Two steps, with the selection strategy (elsewhere) in between:

1. :func:`token_stats` runs the head forward once, chunk by chunk and without a graph, and returns
   per-token loss, log-sum-exp, optionally entropy, and (by default) the log-softmax rows.
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

Wall-clock follows FLOPs only if the passes over (rows, Vp) blocks, which the FLOPs model does not
count, stay few and off the dropped rows (docs/benchmarks.md, selection_step): the forward makes one
pass after its matmul (an in-place log-softmax), the exp and the row scale happen only on the kept
rows in the backward, and on a CPU the blocks are reused (:class:`Workspace`) instead of faulted in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.profiler import record_function


@dataclass
class TokenStats:
    loss: Tensor  # (M,) float32, −log p(label), detached
    lse: Tensor  # (M,) float32, log Σ_v exp(logit_v)
    entropy: Tensor | None = None  # (M,) float32, −Σ_v p_v log p_v
    # (M, Vp) float32 log-softmax, kept for weighted_loss's backward, which exponentiates the
    # selected rows only. weighted_loss takes it over (every row kept: exp in place, no copy), so
    # it sets this field to None and nothing can read a consumed buffer.
    log_probs: Tensor | None = None


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


class Workspace:
    """Float32 blocks for the head's (rows, Vp) work, reused instead of allocated afresh.

    On a CPU every large tensor is a fresh ``mmap`` whose pages fault in, zeroed, on first touch:
    writing a new (1024, 50304) block cost ~60 ms where the same write to a block in use took ~14 ms,
    and a training step of the selection_step model allocated ~1 GB of such blocks (the logits
    and log-probabilities of each chunk, the kept softmax). A workspace hands out views of buffers
    it keeps, so after the first step the head writes to mapped memory. On other devices the
    caching allocator already reuses blocks and ``block`` allocates normally.

    A view is valid until the same name is asked for again: the training step asks for "log_probs"
    once per micro-batch, and the backward consumes it before the next micro-batch's forward.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def block(self, name: str, rows: int, cols: int, device: torch.device) -> Tensor:
        if device.type != "cpu":
            return torch.empty(rows, cols, dtype=torch.float32, device=device)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < rows * cols:
            self._buffers.pop(name, None)  # free the old buffer before the larger one is allocated
            buffer = self._buffers[name] = torch.empty(rows * cols, dtype=torch.float32)
        return buffer[: rows * cols].view(rows, cols)


def _logits_into(out: Tensor, hidden: Tensor, weight: Tensor) -> Tensor:
    """``hidden @ weight.T`` written into the float32 block ``out``: straight from the matmul in
    float32, through one cast under autocast or low-precision inputs (the matmul then runs in that
    precision, as plain autograd's would)."""
    if hidden.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled(hidden.device.type):
        return torch.matmul(hidden, weight.T, out=out)
    return out.copy_(hidden @ weight.T)


# Rows per elementwise block on a CPU: a (4, 50304) float32 block is 0.8 MB, so it and its scratch
# stay in L2 from one pass to the next. Measured at Vp = 50304, the entropy's three passes took 32 ms
# per 1024 rows in blocks of 4 and 52 ms over whole chunks.
CPU_ROW_BLOCK = 4


def _entropy_into(ent: Tensor, logp: Tensor, scratch: Callable[[int], Tensor]) -> None:
    """H = −Σ_v p_v·log p_v per row of ``logp``: exp into a scratch block, product, row sum. On a CPU
    the rows go in blocks of CPU_ROW_BLOCK, so the three passes run in cache, not in memory."""
    block = CPU_ROW_BLOCK if logp.device.type == "cpu" else logp.shape[0]
    for i in _row_chunks(logp.shape[0], block):
        lp = logp[i : i + block]
        p = torch.exp(lp, out=scratch(lp.shape[0]))
        ent[i : i + block] = -torch.mul(p, lp, out=p).sum(-1)


def _fill_chunk(x: Tensor, labels: Tensor, rows: slice, loss: Tensor, lse: Tensor, ent: Tensor | None,
                scratch: Callable[[int], Tensor]) -> None:
    """Per-row statistics of one float32 (chunk, Vp) block of logits ``x``, written at ``rows``.

    One log-softmax pass, in place, gives the loss and the log-sum-exp and leaves log p in x (the
    caller's block, which it keeps for the backward or reuses). No softmax is written here: the
    backward exponentiates the rows it keeps, so dropped rows never pay that pass. Only the
    entropy needs p, in small ``scratch`` blocks."""
    label_logit = x.gather(1, labels[rows, None]).squeeze(1)
    logp = torch.log_softmax(x, dim=-1, out=x)
    label_logp = logp.gather(1, labels[rows, None]).squeeze(1)
    loss[rows] = -label_logp
    lse[rows] = label_logit - label_logp  # log-sum-exp = logit_y − log p_y
    if ent is not None:
        _entropy_into(ent[rows], logp, scratch)


@torch.no_grad()
@record_function("slm.head.forward")  # named in profiles (benchmarks/step_profile.py); free otherwise
def token_stats(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    chunk_size: int = 1024,
    entropy: bool = False,
    keep_probs: bool = True,
    workspace: Workspace | None = None,
) -> TokenStats:
    """One forward pass of the head, chunked over rows: per-token CE, lse, entropy, log-softmax.

    Logits are computed in ``hidden``'s dtype (or the autocast dtype), softmax statistics in
    float32. The only (M, Vp) tensor is the ``log_probs`` buffer when ``keep_probs``: each chunk's
    logits are written into it and turned into log p in place. Otherwise the peak is one
    (chunk_size, Vp) block. The entropy adds a few rows of scratch. With a ``workspace`` the blocks
    (``log_probs`` included) are the workspace's, reused from one call to the next.
    """
    M, Vp = hidden.shape[0], weight.shape[0]
    ws = workspace or Workspace()
    w = weight.to(hidden.dtype)
    loss = hidden.new_empty(M, dtype=torch.float32)
    lse = torch.empty_like(loss)
    ent = torch.empty_like(loss) if entropy else None
    log_probs = ws.block("log_probs", M, Vp, hidden.device) if keep_probs else None
    for s in _row_chunks(M, chunk_size):
        rows = slice(s, s + chunk_size)
        x = log_probs[rows] if log_probs is not None else ws.block("logits", min(chunk_size, M - s), Vp, hidden.device)
        _fill_chunk(_logits_into(x, hidden[rows], w), labels, rows, loss, lse, ent,
                    lambda n: ws.block("entropy", n, Vp, hidden.device))
    return TokenStats(loss=loss, lse=lse, entropy=ent, log_probs=log_probs)


@torch.no_grad()
def model_token_stats(
    model: torch.nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    *,
    entropy: bool = False,
    chunk_size: int = 1024,
    workspace: Workspace | None = None,
    exit_layer: int | None = None,
    positions: Tensor | None = None,
) -> TokenStats:
    """Per-token statistics of an slm GPT on (B, T) ``input_ids`` and ``labels``: flat (B·T,)
    loss, lse and optionally entropy, without a graph and without keeping the log-softmax.

    The one way every reader (validation, `slm eval`, references, scoring passes, token pages)
    runs the model for statistics: the head runs inside the model's forward (so FSDP gathers the
    tied weight), chunked, and no (B, T, Vp) logits tensor exists. ``exit_layer`` stops the trunk
    after that many blocks (an early exit through the final LayerNorm and the tied head,
    :meth:`slm_cli.model.gpt.GPT.forward`); ``positions`` (P,) runs the head on those positions of
    every window only, giving flat (B·P,) statistics in window-major order."""
    y = labels if positions is None else labels[:, positions]

    def head(hidden: Tensor, weight: Tensor) -> TokenStats:
        h = hidden if positions is None else hidden[:, positions]
        return token_stats(h.reshape(-1, h.shape[-1]), weight, y.reshape(-1), chunk_size=chunk_size,
                           entropy=entropy, keep_probs=False, workspace=workspace)

    if exit_layer is None:
        return model(input_ids, head=head)
    return model(input_ids, head=head, exit_layer=exit_layer)


@torch.no_grad()
def logits_stats(logits: Tensor, labels: Tensor, *, entropy: bool = True) -> TokenStats:
    """The statistics of :func:`token_stats` from ready (M, V) logits (a Hugging Face model's
    output), in float32 row chunks of about 64 MB so that the float32 copy stays bounded."""
    M = logits.shape[0]
    chunk_size = max(1, (1 << 24) // logits.shape[1])
    loss = torch.empty(M, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(loss)
    ent = torch.empty_like(loss) if entropy else None
    ws = Workspace()
    for s in _row_chunks(M, chunk_size):
        rows = slice(s, s + chunk_size)
        x = ws.block("logits", min(chunk_size, M - s), logits.shape[1], logits.device).copy_(logits[rows])  # ours to overwrite
        _fill_chunk(x, labels, rows, loss, lse, ent, lambda n: ws.block("entropy", n, logits.shape[1], logits.device))
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


def _exp_rows(log_probs: Tensor, rows: Tensor, out: Tensor) -> Tensor:
    """``exp(log_probs[rows])`` written into ``out`` (rows ascending): the kept rows' softmax, contiguous
    for the gradient matmuls.

    On a CPU each run of consecutive rows is read where it lies and exponentiated straight into
    ``out``: one pass over the kept rows. A gather into ``out`` then an in-place exp is two passes,
    and measured 1.45× slower at k = 0.6 (M = 2048, Vp = 50304: 49 ms against 34). Elsewhere the
    per-run calls would be one kernel launch each, so the gather stays."""
    if log_probs.device.type != "cpu":
        return torch.index_select(log_probs, 0, rows, out=out).exp_()
    starts = torch.cat([rows.new_zeros(1), (rows.diff() != 1).nonzero().squeeze(1) + 1]).tolist()
    ends = starts[1:] + [rows.numel()]
    for src, a, b in zip(rows[starts].tolist(), starts, ends, strict=True):
        torch.exp(log_probs[src : src + b - a], out=out[a:b])
    return out


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
        log_probs: Tensor | None,
        target_ids: Tensor | None,
        target_probs: Tensor | None,
        chunk_size: int,
        workspace: Workspace | None,
    ) -> Tensor:
        rows = weights.nonzero().squeeze(1)
        if target_ids is None:
            value = (weights[rows] * loss[rows]).sum()  # the one-hot CE is already in stats.loss
        else:
            value = (weights[rows] * _soft_ce(hidden, weight, lse, rows, target_ids, target_probs, chunk_size)).sum()
        ctx.save_for_backward(hidden, weight, labels, weights, rows, log_probs, target_ids, target_probs)
        ctx.chunk_size = chunk_size
        ctx.workspace = workspace or Workspace()
        # Replay the caller's autocast state in backward (what torch.amp.custom_bwd does), so that
        # the backward matmuls run in the same precision as plain autograd would use.
        ctx.device_type = hidden.device.type
        ctx.autocast = torch.is_autocast_enabled(ctx.device_type)
        ctx.autocast_dtype = torch.get_autocast_dtype(ctx.device_type)
        return value

    @staticmethod
    @record_function("slm.head.backward")
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, labels, weights, rows, log_probs, target_ids, target_probs = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w: Tensor | None = None  # the first chunk's product, then accumulated
        w = weight.to(hidden.dtype)
        # In float32 without autocast the weight gradient accumulates in place (addmm_), with no
        # (Vp, d) product per chunk; under autocast the product runs in its dtype, as autograd's would.
        fp32 = hidden.dtype == torch.float32 and not ctx.autocast
        # When every row is kept (CLM), slices give views instead of gathered copies.
        all_rows = rows.numel() == hidden.shape[0]
        with torch.autocast(ctx.device_type, dtype=ctx.autocast_dtype, enabled=ctx.autocast):
            for s in _row_chunks(rows.numel(), ctx.chunk_size):
                r = slice(s, s + ctx.chunk_size) if all_rows else rows[s : s + ctx.chunk_size]
                h = hidden[r]
                # G_j = w_j·(p_j·Σy_j − y_j): the row scale w_j goes on the (rows, d) side of both
                # matmuls, so no pass over the (rows, Vp) block is spent on it.
                scale = weights[r].float() * grad_out.float()
                n = scale.shape[0]
                if log_probs is None:  # recompute mode: one more (k·M, d) × (d, Vp) matmul
                    x = ctx.workspace.block("logits", n, w.shape[0], h.device)
                    G = torch.softmax(_logits_into(x, h, w), dim=-1, out=x)
                elif all_rows:  # store mode consumes the kept log-softmax in place
                    G = log_probs[r].exp_()
                else:  # the kept rows' softmax, contiguous in a reused block
                    G = _exp_rows(log_probs, r, ctx.workspace.block("kept", n, w.shape[0], h.device))
                if target_ids is None:
                    G[torch.arange(n, device=G.device), labels[r]] -= 1.0
                else:
                    y = target_probs[r].float()
                    G.mul_(y.sum(-1, keepdim=True))
                    G.scatter_add_(1, target_ids[r], -y)  # duplicate ids add up
                G = G.to(hidden.dtype)
                if grad_h is not None:
                    grad_h[r] = ((G @ w).float() * scale[:, None]).to(hidden.dtype)
                if need_w:
                    h_scaled = (h.float() * scale[:, None]).to(hidden.dtype)
                    if grad_w is None:
                        grad_w = (G.T @ h_scaled).float()
                    elif fp32:
                        grad_w.addmm_(G.T, h_scaled)
                    else:
                        grad_w += (G.T @ h_scaled).float()
                del G  # a fresh block off the CPU (or a low-precision copy): freed before the next chunk's
        if need_w:
            grad_w = torch.zeros_like(weight) if grad_w is None else grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None, None, None


def weighted_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    weights: Tensor,
    stats: TokenStats,
    *,
    targets: SparseTargets | None = None,
    chunk_size: int = 1024,
    workspace: Workspace | None = None,
) -> Tensor:
    """Scalar Σ_j w_j·CE(y_j, p_j), differentiable w.r.t. ``hidden`` and ``weight``.

    ``y_j`` is one-hot on ``labels`` unless ``targets`` is given. ``weights`` (M,) are nonnegative
    constants already normalised by the caller (1/M for CLM; 1/|S| on a selection S, 0 elsewhere;
    divided by the global count across ranks/micro-batches if need be). ``stats`` must come from
    :func:`token_stats` on the same ``hidden``/``weight``; with ``stats.log_probs`` the backward reuses
    it (store mode), otherwise it recomputes the kept rows' logits (recompute mode). The full
    logits are never recomputed. The kept log-softmax is consumed by the backward: ``stats.log_probs`` is
    None on return (the other fields stay valid). Recompute mode takes its (chunk, Vp) block from
    ``workspace`` when one is given.
    """
    log_probs, stats.log_probs = stats.log_probs, None
    return _WeightedHeadCE.apply(
        hidden,
        weight,
        labels,
        weights,
        stats.loss,
        stats.lse,
        log_probs,
        None if targets is None else targets.ids,
        None if targets is None else targets.probs,
        chunk_size,
        workspace,
    )
