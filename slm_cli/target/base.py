"""The interface every training target implements.

A target turns a training batch into the distribution y_j each token is trained towards, as
sparse (id, probability) pairs (slm_cli.loss.SparseTargets), so that the loss never builds a dense
B×T×V target tensor. ``None`` means the one-hot next token, the exact CLM path. The selection
strategy decides *which* tokens are trained on; the target decides *towards what*; the two compose.

A new target is one module here plus one YAML file in conf/target/ whose `_target_` names it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from slm_cli.config import fraction
from slm_cli.errors import SlmError
from slm_cli.loss import SparseTargets

if TYPE_CHECKING:
    from slm_cli.data.prepared import PreparedData


class Target:
    name: str = "base"

    def token_arrays(self, prepared: PreparedData) -> dict[str, np.ndarray]:
        """Per-token arrays aligned with train.bin to gather into every training batch."""
        return {}

    def targets(self, batch: Mapping[str, Tensor]) -> SparseTargets | None:
        """Flat (M, K) targets for the batch's (B, T) labels, or None for one-hot."""
        raise NotImplementedError

    def max_entries(self) -> int:
        """The widest K :meth:`targets` can return (known after :meth:`token_arrays`), so that
        training can refuse up front a batch whose (M, K) targets would not fit."""
        return 1

    def extra_forward_flops(self, tokens: int) -> float:
        """Forward FLOPs the target spends outside the trained model for ``tokens`` tokens (a KD
        teacher run on every micro-batch), counted in the nominal and realised totals."""
        return 0.0


def check_weight(value: object) -> float:
    return fraction("target.weight", value, closed=True, example="0.5 (0 is plain CLM)")


def mix_with_onehot(labels: Tensor, ids: Tensor, probs: Tensor, weight: float) -> SparseTargets:
    """y_j = (1 − λ)·e_{x_j} + λ·s_j with the soft part s_j given as (ids, probs) rows.

    Rows whose soft part is empty (an incomplete n-gram context at the start of the stream) keep
    the one-hot target alone, with weight 1, so no token loses target mass.
    """
    labels = labels.reshape(-1, 1)
    ids = ids.reshape(labels.shape[0], -1).long()
    probs = probs.reshape(labels.shape[0], -1).float()
    has_soft = probs.sum(-1, keepdim=True) > 0
    onehot = torch.where(has_soft, 1.0 - weight, 1.0).to(probs.dtype)
    return SparseTargets(ids=torch.cat([labels, ids], dim=1), probs=torch.cat([onehot, weight * probs], dim=1))


def check_ngram_settings(n: object, r: object) -> None:
    """The n-gram builder's checks, reported under this config's keys (target.n, target.r)."""
    from slm_cli.ngram.build import check_settings

    try:
        check_settings(n, r)
    except SlmError as exc:
        raise SlmError(str(exc).replace("ngram.", "target.")) from None
