"""Autoregressive sampling from a GPT: temperature, top-k, greedy at temperature 0.

No KV cache: each new token runs the model over the (cropped) context again, which is simple and
fast enough for the small models slm trains; only the last position's logits are computed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slm_cli.model.gpt import GPT


@torch.no_grad()
def generate(model: GPT, idx: Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
             eos_id: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Extend each row of ``idx`` (B, T) by up to ``max_new_tokens`` tokens; returns only the new
    tokens (B, n). ``temperature=0`` takes the most likely token (greedy, ties to the lowest id
    like ``torch.argmax``). The context is the last ``block_size`` tokens (a longer prompt is cropped
    from the left). With ``eos_id``, a row stops at its first EOS (kept) and is padded with
    ``eos_id`` after it; generation ends when every row has stopped. Only the tokenizer's ids
    (``config.vocab_size``) are sampled, never the padding rows of the head.
    """
    vocab = model.config.vocab_size
    block = model.config.block_size
    out = torch.empty(idx.shape[0], 0, dtype=torch.long, device=idx.device)
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        context = torch.cat([idx, out], dim=1)[:, -block:]
        logits = model(context, head=lambda h, w: h[:, -1] @ w[:vocab].T).float()  # (B, V)
        if temperature == 0:
            token = logits.argmax(dim=-1)
        else:
            logits = logits / temperature
            if top_k is not None and top_k < vocab:
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        if eos_id is not None:
            token = token.masked_fill(done, eos_id)
            done |= token == eos_id
        out = torch.cat([out, token[:, None]], dim=1)
        if eos_id is not None and bool(done.all()):
            break
    return out
