"""CoCoNTs: compact, consistent next-token distributions (arXiv 2407.02819).

`slm ngram` stores, for every training position j, the top-r entries of the full n-gram
distribution y^all_j of its context c_j (docs/ngram.md). The target is (our normalisation, after
docs/methods.md)

    y^CC_j = y^all_j restricted to top-r(c_j) + 1[x_j ∉ top-r(c_j)] · e_{x_j},

so that, averaged over the positions that share a context c, y^CC equals y^all(c) exactly: the
top-r entries appear as stored, and the mass of every other next token v arrives through the
positions where x_j = v, with probability y^all(c)[v]. A single row is therefore not normalised
(it sums to P(top-r) or P(top-r) + 1) but its expectation is; the loss handles unnormalised rows
(the gradient is p·Σy − y). Training mixes it with the one-hot target:

    y_j = (1 − λ)·e_{x_j} + λ·y^CC_j,   λ = target.weight,

as (1 + r + 1) (id, probability) pairs per token: no dense B×T×V tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from slm_cli.loss import SparseTargets
from slm_cli.target.base import Target, check_ngram_settings, check_weight, mix_with_onehot

if TYPE_CHECKING:
    from slm_cli.data.prepared import PreparedData


class CoCoNTs(Target):
    name = "coconts"

    def __init__(self, name: str = "coconts", n: int = 4, r: int = 8, weight: float = 0.5,
                 path: str | None = None) -> None:
        check_ngram_settings(n, r)
        self.name, self.n, self.r, self.path = name, int(n), int(r), path
        self.weight = check_weight(weight)

    def token_arrays(self, prepared: PreparedData) -> dict[str, np.ndarray]:
        if self.weight == 0:
            return {}
        from slm_cli.ngram.build import load_ngram

        return load_ngram(prepared, self.n, self.r, path=self.path)

    def max_entries(self) -> int:
        return 1 + self.r + 1  # the one-hot column, the top r, the label outside the top r

    def targets(self, batch: Mapping[str, Tensor]) -> SparseTargets | None:
        if self.weight == 0:  # λ = 0 is CLM exactly: the one-hot path, not a soft target of mass 0
            return None
        labels, ids, probs = batch["labels"], batch["ngram_ids"], batch["ngram_probs"].float()
        real = probs > 0  # padding slots hold id 0 with probability 0
        in_top = ((ids.long() == labels[..., None]) & real).any(-1, keepdim=True)
        # The label's own slot carries its mass when it is outside the stored top r.
        complete = real.any(-1, keepdim=True)
        extra = (~in_top & complete).to(probs.dtype)
        soft_ids = torch.cat([ids.long(), labels[..., None]], dim=-1)
        soft_probs = torch.cat([probs, extra], dim=-1)
        return mix_with_onehot(labels, soft_ids, soft_probs, self.weight)
