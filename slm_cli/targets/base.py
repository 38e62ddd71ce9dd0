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

from slm_cli.errors import SlmError
from slm_cli.loss import SparseTargets

if TYPE_CHECKING:
    from slm_cli.data.prepare import PreparedData


class Target:
    name: str = "base"

    def aligned(self, prepared: PreparedData) -> dict[str, np.ndarray]:
        """Per-token arrays aligned with train.bin to gather into every training batch."""
        return {}

    def targets(self, batch: Mapping[str, Tensor]) -> SparseTargets | None:
        """Flat (M, K) targets for the batch's (B, T) labels, or None for one-hot."""
        raise NotImplementedError


def check_weight(value: object) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1
    if not ok:
        raise SlmError(f"target.weight={value} must be in [0, 1]: e.g. target.weight=0.5 (0 is plain CLM)")
    return float(value)


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
