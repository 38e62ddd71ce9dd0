"""ESLM and Ada-ESLM: risk-averse selective language modelling (arXiv 2505.19893).

ESLM scores every token of the batch (one micro-batch by default, or the global batch:
slm_cli/selection/scope.py) by its risk S_j (the model's loss ℓ_j or predictive entropy H_j, computed without gradient) and
trains only on the high-risk tail: the tokens at or above the batch's value-at-risk at
confidence α. With S_j = ℓ_j the training loss, the mean loss
over the kept tokens, is the empirical conditional value-at-risk (Rockafellar–Uryasev)

    CVaR_α(ℓ) = min_τ { τ + 1/((1−α)M) · Σ_j (ℓ_j − τ)_+ },

so ESLM minimises a distributionally robust objective: the worst-case average over any (1−α)
share of the batch, the adversary's mask being closed-form (docs/methods.md).

Rounding and ties (deterministic, and the same on every device): ESLM keeps exactly
k = ⌈(1−α)·M⌉ tokens (keep_count), the k highest scores, equal scores broken towards the lower
index (top_k_mask). The logged threshold is the k-th highest score, the upper empirical
α-quantile inf{s : #{S_j ≤ s} > α·M}. When α·M is not an integer that is the value-at-risk
VaR_α = inf{s : #{S_j ≤ s} ≥ α·M} of docs/methods.md; when (1−α)·M is an integer it is the upper end
of the interval of Rockafellar–Uryasev minimisers (whose lower end is VaR_α), both give the same
minimum, and the kept tokens' mean loss equals CVaR_α exactly. Otherwise the kept mean is the
CVaR at the effective level 1 − k/M, the nearest level that whole tokens can realise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from slm_cli.config import is_number
from slm_cli.errors import SlmError
from slm_cli.selection.base import Selected, Selection, check_choice, check_fraction, keep_count, top_k_mask

SCORES = ("loss", "entropy")


class ESLM(Selection):
    """Keep the ⌈(1−α)M⌉ highest-risk tokens of the M tokens selected over: one micro-batch
    (trainer.selection_scope=micro_batch, the default) or the whole global batch (every micro-batch
    on every device; global_batch), as slm_cli/selection/scope.py hands them over.

    The default α = 0.4 keeps 60% of the tokens, the same budget as `random` (ratio 0.6) and the
    Rho-1 default, so the strategies compare at equal FLOPs out of the box; larger α (the paper
    studies high confidence levels) trains on fewer tokens and saves more.
    """

    name = "eslm"

    def __init__(self, name: str = "eslm", score: str = "loss", alpha: float = 0.4) -> None:
        self.name = name
        self.score = check_choice("selection.score", score, SCORES)
        self.alpha = check_fraction("selection.alpha", alpha)
        self.needs_entropy = self.score == "entropy"

    def select(self, features: Mapping[str, Tensor]) -> Selected:
        scores = features[self.score]
        mask, threshold = top_k_mask(scores, keep_count(1.0 - self.alpha, scores.numel()))
        return Selected(mask=mask, metrics={"alpha": self.alpha, "threshold": threshold})

    def keep_fraction(self) -> float:
        return 1.0 - self.alpha


class AdaESLM(ESLM):
    """ESLM whose confidence α follows how much of the batch the model already predicts well.

    The paper adapts α during training but its exact rule is not available to us; this controller
    is *our choice* (docs/methods.md). After each optimizer step's selection, which uses the current α,

        easy_frac = #{j : ℓ_j < easy_loss} / M          (default easy_loss = ln 2, i.e. p > 1/2)
        α ← clip((1 − momentum)·α + momentum·easy_frac, alpha_min, alpha_max)

    so α tracks (an exponential moving average of) the share of tokens already learned, and
    training concentrates on the rest: early on few tokens are easy and α falls towards alpha_min
    (train on most tokens), later it rises and selection gets sharper. easy_frac always uses the
    model's loss, whatever `score` ranks the tokens by. α is updated once per optimizer step from
    the step's whole global batch (every micro-batch on every device, whatever trainer.selection_scope),
    so all devices hold the same α; it is logged as selection/alpha and saved in checkpoints
    (state_dict) so that a resumed run continues with the same α.
    """

    name = "ada_eslm"
    adapts = True

    def __init__(
        self,
        name: str = "ada_eslm",
        score: str = "loss",
        alpha: float = 0.5,
        alpha_min: float = 0.2,
        alpha_max: float = 0.9,
        momentum: float = 0.05,
        easy_loss: float = math.log(2),
    ) -> None:
        super().__init__(name=name, score=score, alpha=alpha)
        self.alpha_min = check_fraction("selection.alpha_min", alpha_min)
        self.alpha_max = check_fraction("selection.alpha_max", alpha_max)
        if not self.alpha_min <= self.alpha <= self.alpha_max:
            raise SlmError(f"selection.alpha={alpha} must lie in [selection.alpha_min, selection.alpha_max] = "
                           f"[{alpha_min}, {alpha_max}]: change one of them")
        self.momentum = check_fraction("selection.momentum", momentum)
        if not (is_number(easy_loss) and easy_loss > 0):
            raise SlmError(f"selection.easy_loss={easy_loss} must be a positive loss in nats: "
                           f"e.g. selection.easy_loss=0.693 (ln 2)")
        self.easy_loss = float(easy_loss)

    def update(self, features: Mapping[str, Tensor]) -> dict[str, float]:
        loss = features["loss"]
        easy_frac = int((loss < self.easy_loss).sum()) / loss.numel()
        mixed = (1.0 - self.momentum) * self.alpha + self.momentum * easy_frac
        self.alpha = min(max(mixed, self.alpha_min), self.alpha_max)
        return {"easy_frac": easy_frac}

    def plan_keep_fractions(self) -> dict[str, float]:
        """α moves within [alpha_min, alpha_max]: the plan is made at alpha_min, the most tokens
        and where α settles within ~20 steps in every run of docs/results.md, and at alpha_max."""
        return {"alpha_min": 1.0 - self.alpha_min, "alpha_max": 1.0 - self.alpha_max}

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.alpha = float(state.get("alpha", self.alpha))  # absent: keep the configured start
