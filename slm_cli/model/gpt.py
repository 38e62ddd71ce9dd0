"""The GPT-2 family (Radford et al. 2019) in one file, after nanoGPT's ``model.py``.

Parameter names follow GPT-2 (``wte``, ``wpe``, ``h.{i}.attn.c_attn``, ``ln_f``, ``lm_head``...) so
that the export to Hugging Face (slm_cli/model/hf.py) is a renaming, not a conversion. The model
stops at the final LayerNorm: the LM head's matmul is handed to a ``head`` callable (normally the
chunked losses of :mod:`slm_cli.loss`) so that the full B×T×V logits tensor is never built by the
model itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from slm_cli.errors import SlmError


def padded_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    """Round ``vocab_size`` up to a multiple of ``multiple`` (50257 -> 50304).

    Why: matmuls whose inner/outer dims are multiples of 64 hit faster kernels (nanoGPT reports
    ~25% on the head). The extra rows are classes that never appear as targets, so training pushes
    their probability towards zero; they are dropped again on export.
    """
    return multiple * math.ceil(vocab_size / multiple)


@dataclass
class GPTConfig:
    block_size: int = 1024  # maximum context length T
    vocab_size: int = 50304  # the tokenizer's real vocabulary; the model pads it (see padded_vocab)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm as in GPT-2 (nanoGPT finds False a bit faster)

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise SlmError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                "choose n_embd as a multiple of n_head"
            )
        if min(self.block_size, self.vocab_size, self.n_layer, self.n_head) < 1:
            raise SlmError("model.block_size, vocab_size, n_layer and n_head must all be positive")

    @property
    def padded_vocab(self) -> int:
        """Rows of the embedding and of the tied LM head."""
        return padded_vocab_size(self.vocab_size)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # Fused kernel (flash / memory-efficient where available); the causal mask is implicit.
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2 uses the tanh approximation ("gelu_new" in Hugging Face); using it too keeps the
        # export to Hugging Face (slm_cli/model/hf.py) function-preserving, not only name-preserving.
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN residual block (GPT-2: LayerNorm at the input of each sub-block)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab, bias=False)
        # Weight tying (Press & Wolf 2017, arXiv 1608.05859), as in GPT-2: one (Vp, d) tensor is
        # both the input embedding and the output projection.
        self.transformer.wte.weight = self.lm_head.weight

        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2·n_layer), since each block adds two of
        # them to the residual stream and its variance would otherwise grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: Tensor, head: Callable[[Tensor, Tensor], Any] | None = None,
                exit_layer: int | None = None) -> Any:
        """Final hidden states ``ln_f(...)`` of shape (B, T, d), or ``head(hidden, lm_head.weight)``.

        The head is applied here rather than by the caller so that, under FSDP, the tied
        (Vp, d) weight is gathered while this module's forward (and its backward) runs.
        ``exit_layer`` = ℓ stops after the first ℓ blocks and applies ``ln_f`` and the head there:
        an early exit with no parameters of its own (instance selection scores windows with it).
        """
        t = idx.shape[1]
        if t > self.config.block_size:
            raise SlmError(
                f"sequence length {t} exceeds model.block_size={self.config.block_size}; "
                "use data windows no longer than the model's block_size"
            )
        pos = torch.arange(t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        blocks = self.transformer.h if exit_layer is None else self.transformer.h[:exit_layer]
        for block in blocks:
            x = block(x)
        x = self.transformer.ln_f(x)
        return x if head is None else head(x, self.lm_head.weight)

    def logits(self, idx: Tensor) -> Tensor:
        """Full (B, T, Vp) logits, padded columns included (as nanoGPT).

        For small-scale use and generation only: training goes through ``forward(idx, head=...)``.
        Slice ``[..., :config.vocab_size]`` before sampling.
        """
        return self(idx, head=lambda h, w: h @ w.T)

    def num_params(self, exclude_position_embeddings: bool = True) -> int:
        """Parameter count, the tied wte/lm_head counted once.

        By default ``wpe`` is excluded, as in nanoGPT, because it takes part in no matmul; the
        token embedding stays in because, tied, it is the LM head's weight.
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields shared tensors once
        if exclude_position_embeddings:
            n -= self.transformer.wpe.weight.numel()
        return n

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups as in nanoGPT: weight decay on every tensor with ≥2 dims (matmul weights
        and embeddings), none on biases and LayerNorm gains. The tied wte/lm_head appears once."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
