"""The interface every token-selection strategy implements.

A strategy looks at per-token statistics of the current batch (the model's loss and, on request, its
predictive entropy; later also reference losses carried by the batch) and returns a 0/1 mask of the
tokens to train on. The training loop turns the mask into per-token weights 1/|S| and computes the
LM-head backward only for the selected rows (slm_cli/loss.py), so a strategy never touches gradients.

A new strategy is one module here plus one YAML file in conf/selection/ whose `_target_` names it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from slm_cli.loss import TokenStats


@dataclass
class Selected:
    """The result of selecting on one batch."""

    mask: Tensor  # (M,) bool: True for the tokens trained on
    metrics: dict[str, float] = field(default_factory=dict)  # logged as selection/<key>


class Selection:
    """Base class: keep every token (subclasses override :meth:`select`)."""

    name: str = "base"
    needs_entropy: bool = False  # ask token_stats for per-token predictive entropy

    def select(self, stats: TokenStats, batch: Mapping[str, Tensor]) -> Selected:
        raise NotImplementedError

    def extra_forward_flops(self, tokens: int) -> float:
        """FLOPs the strategy spends outside the trained model (e.g. an online reference forward)."""
        return 0.0

    # Strategies with state (Ada-ESLM's alpha) save it in checkpoints so that resume is exact.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None
