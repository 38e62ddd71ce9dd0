"""AllNTs: the full n-gram next-token distribution as the target (arXiv 2407.02819).

    y_j = (1 − λ)·e_{x_j} + λ·y^all_j,   y^all_j[v] = count(c_j·v) / count(c_j),

with c_j the n−1 tokens before token j, counted over the training split (no smoothing, as in the
authors' counting code). This is the costly baseline that CoCoNTs compresses: every step looks up
each position's context in the count table and gathers *all* of its continuations, K = the largest
number of distinct continuations of a context in the batch, so the target grows with the corpus.
It is computed for real, not approximated, so its cost can be measured (docs/benchmarks.md).

The count table is built when training starts, with the same vectorised counting as `slm ngram`
(packed uint64 keys, sorted, run-length counted), and kept in memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from slm_cli.loss import SparseTargets
from slm_cli.ngram.keys import context_keys_at
from slm_cli.target.base import Target, check_ngram_settings, check_weight, mix_with_onehot

if TYPE_CHECKING:
    from slm_cli.data.prepared import PreparedData


class AllNTs(Target):
    name = "allnts"

    def __init__(self, name: str = "allnts", n: int = 4, weight: float = 0.5) -> None:
        check_ngram_settings(n, 1)
        self.name, self.n = name, int(n)
        self.weight = check_weight(weight)
        self.tokens: np.ndarray | None = None
        self.widest = 0

    def token_arrays(self, prepared: PreparedData) -> dict[str, np.ndarray]:
        from slm_cli.ngram.build import count_ngrams
        from slm_cli.ngram.keys import check_key_width

        self.tokens = prepared.tokens("train")
        self.bits = check_key_width(self.n, prepared.vocab_size)
        keys, counts = count_ngrams(self.tokens, self.n, self.bits, progress=True)
        self.next_ids = (keys & np.uint64((1 << self.bits) - 1)).astype(np.int64)
        self.contexts = keys >> np.uint64(self.bits)  # sorted, since the keys are
        self.cum = np.concatenate(([0], np.cumsum(counts, dtype=np.int64)))
        # The most distinct continuations of any context: the widest soft part a row can have.
        starts = np.flatnonzero(np.concatenate(([True], self.contexts[1:] != self.contexts[:-1], [True])))
        self.widest = int(np.diff(starts).max()) if len(self.contexts) else 0
        return {}  # the batch's `positions` locate each label in the stream

    def max_entries(self) -> int:
        return 1 + max(1, self.widest)  # the one-hot column, then the continuations

    def targets(self, batch: Mapping[str, Tensor]) -> SparseTargets | None:
        if self.weight == 0:
            return None
        assert self.tokens is not None, "AllNTs.token_arrays(prepared) builds the count table first"
        pos = batch["positions"].reshape(-1).cpu().numpy()
        complete = pos >= self.n - 1
        ctx = context_keys_at(self.tokens, pos, self.n, self.bits)
        lo = np.searchsorted(self.contexts, ctx, side="left")
        hi = np.where(complete, np.searchsorted(self.contexts, ctx, side="right"), lo)
        width = max(1, int((hi - lo).max()))
        slot = lo[:, None] + np.arange(width)
        real = slot < hi[:, None]
        slot = np.where(real, slot, 0)
        counts = np.where(real, self.cum[slot + 1] - self.cum[slot], 0)
        total = np.maximum(self.cum[hi] - self.cum[lo], 1)
        ids = torch.from_numpy(np.where(real, self.next_ids[slot], 0))
        probs = torch.from_numpy(counts / total[:, None])
        labels = batch["labels"]
        return mix_with_onehot(labels, ids.to(labels.device), probs.to(labels.device), self.weight)
