"""The interface every token-selection strategy implements.

A strategy decides in three steps, which the training step (slm_cli/module.py) calls:

1. :meth:`Selection.features`: per micro-batch, on the device that holds it, the flat per-token
   values the decision needs: the model's loss and, on request, its predictive entropy, plus
   anything from the batch itself (per-token arrays stored beside the corpus, such as reference
   losses).
2. :meth:`Selection.select`: the 0/1 mask over a set of tokens: one micro-batch's (the default
   trainer.selection_scope=micro_batch) or the whole global batch's, gathered across micro-batches
   and devices (global_batch); slm_cli/selection/scope.py decides which.
3. :meth:`Selection.update`: once per optimizer step, with the features of the whole global
   batch, for strategies that :attr:`adapt <Selection.adapts>` (Ada-ESLM's α), so every device
   holds the same state.

A strategy may also select whole windows first (instance-level selection, :attr:`exit_layer`):
the training step scores each window of a micro-batch with an early exit of the model
(slm_cli/selection/instances.py), :meth:`select_windows` keeps some, and only those go through the
full forward and backward, where the token-level selection above applies.

The training step turns the mask into per-token weights and computes the LM-head backward only for
the selected rows (slm_cli/loss.py), so a strategy never touches gradients. What a plan or a report
needs to know of a strategy is asked of it (:meth:`keep_fraction`, :meth:`plan_keep_fractions`).

A new strategy is one module here plus one YAML file in conf/selection/ whose `_target_` names it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from slm_cli.config import fraction
from slm_cli.errors import SlmError
from slm_cli.loss import TokenStats

if TYPE_CHECKING:
    from slm_cli.data.prepared import PreparedData
    from slm_cli.model.gpt import GPTConfig


@dataclass
class Selected:
    """The result of one selection (over a micro-batch, or over the whole global batch)."""

    mask: Tensor  # (M,) bool, in the order of the features' rows: True for the tokens trained on
    metrics: dict[str, float] = field(default_factory=dict)  # logged as selection/<key>


class Selection:
    """Base class. Subclasses override :meth:`select`, and the other hooks where they need them."""

    name: str = "base"
    needs_entropy: bool = False  # ask token_stats for the model's per-token predictive entropy
    # Whether the mask depends on the model's per-token statistics. CLM's and random's do not: they
    # select from the batch alone, so global scope over several micro-batches needs no scoring
    # pass for them (slm_cli/selection/scope.py) and the baseline pays for no machinery it does not use.
    reads_model: bool = True
    # Whether update() changes the strategy's state (Ada-ESLM's α): only then does the step gather
    # the whole global batch's features for it.
    adapts: bool = False
    # Instance-level selection: blocks the early exit runs to score each window (None: no
    # instance selection; every window of the batch is trained on).
    exit_layer: int | None = None
    score_positions: int | None = None  # positions per window the early exit reads (None: all)

    def features(self, stats: TokenStats | None, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Flat (M,) tensors of one micro-batch that :meth:`select` reads. `stats` is flat
        (M = B·T rows), and None for a strategy that does not :attr:`reads_model`; `batch` holds
        (B, T) tensors: input_ids, labels, positions (stream positions of the labels) and any
        arrays from :meth:`token_arrays`."""
        feats = {"loss": stats.loss}
        if self.needs_entropy:
            assert stats.entropy is not None, "token_stats(entropy=True) is asked for by needs_entropy"
            feats["entropy"] = stats.entropy
        return feats

    def select(self, features: Mapping[str, Tensor]) -> Selected:
        """The mask over the rows of `features` (one micro-batch, or several concatenated in
        global-batch order). It must depend only on the features and the strategy's state, so
        that the same rows give the same mask on any device."""
        raise NotImplementedError

    def update(self, features: Mapping[str, Tensor]) -> dict[str, float]:
        """Adapt the strategy's state after an optimizer step, from the features of the step's
        whole global batch; returns metrics to log. Most strategies keep no state."""
        return {}

    def configure(self, model: GPTConfig) -> None:
        """Called once the model's settings are known (before training and in a dry-run plan), for
        settings that depend on them; raises SlmError for values the model cannot take."""

    def keep_fraction(self) -> float:
        """The share of a batch's tokens this strategy trains on now (1 for CLM): what the
        dry-run plan, the logs and the reports quote as its budget."""
        return 1.0

    def window_keep_fraction(self) -> float:
        """The share of each micro-batch's windows that go through the full forward and backward
        (instance-level selection; 1 without it)."""
        return 1.0

    def plan_keep_fractions(self) -> dict[str, float]:
        """The token keep fractions a plan should show for this strategy, by label: one for most
        strategies; Ada-ESLM's α moves, so its plan shows the bounds of its range."""
        return {"": self.keep_fraction()}

    def select_windows(self, features: Mapping[str, Tensor]) -> Selected:
        """Instance-level selection: the mask over the windows of one micro-batch from their
        per-window features (B,) scored by the early exit. Only strategies with an
        :attr:`exit_layer` are asked."""
        raise NotImplementedError

    def token_arrays(self, prepared: PreparedData) -> dict[str, np.ndarray]:
        """Per-token arrays aligned with train.bin to be gathered into every training batch under
        their key (e.g. precomputed reference losses). Called once before training."""
        return {}

    def window_grid(self, block_size: int) -> int | None:
        """Training windows must start on multiples of this (None: anywhere), when per-token values
        from :meth:`token_arrays` were computed on that grid of windows. Called after it."""
        return None

    def extra_forward_flops(self, tokens: int) -> float:
        """FLOPs the strategy spends outside the trained model (e.g. an online reference forward)."""
        return 0.0

    def scoring_flops(self) -> float:
        """FLOPs spent once before training for this run (RHO-1's reference scoring by `slm score`):
        reported beside the step FLOPs, not in them (summary: flops_reference_scoring)."""
        return 0.0

    # Strategies with state (Ada-ESLM's alpha) save it in checkpoints so that resume is exact.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None


def check_fraction(key: str, value: Any) -> float:
    """A selection fraction (ratio, alpha) must lie strictly between 0 and 1."""
    return fraction(key, value)


def check_choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise SlmError(f"{key}={value} is not known: use one of {', '.join(choices)}")
    return str(value)


def keep_count(keep_fraction: float, m: int) -> int:
    """Tokens kept out of m: ceil(keep_fraction · m), at least 1 (the documented rounding rule)."""
    # The tiny tolerance keeps exact products (e.g. 0.6 · 10) from rounding up through float error.
    return max(1, min(m, math.ceil(keep_fraction * m - 1e-9)))


def top_k_mask(scores: Tensor, k: int) -> tuple[Tensor, float]:
    """Mask of the k highest scores, ties broken towards the lower index (deterministic), and the
    k-th highest score (the threshold: every kept score is >= it).

    A NaN or infinite score is an error, not something to rank: it means the model diverged or a
    stored reference value is missing, and any order placed on it would be arbitrary."""
    m = scores.numel()
    if not bool(torch.isfinite(scores).all()):  # one host sync, which the threshold below needs anyway
        bad = int((~torch.isfinite(scores)).sum())
        raise SlmError(f"{bad} of {m} selection scores are NaN or infinite (a diverged model, or reference "
                       "losses missing for some tokens): lower optim.lr, or re-run `slm score` for this data")
    # A stable sort of the negated scores orders equal scores by index.
    order = torch.sort(-scores.float(), stable=True).indices[:k]
    mask = torch.zeros(m, dtype=torch.bool, device=scores.device)
    mask[order] = True
    return mask, float(scores[order[-1]])
