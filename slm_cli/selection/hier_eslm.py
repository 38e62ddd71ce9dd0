"""Hierarchical ESLM: windows first, then tokens (the authors' later version of arXiv 2505.19893,
"ESLM: Risk-Averse Selective Language Modeling with Hierarchical Batch Selection").

Token masking alone cannot save the trunk's backward: every position feeds later ones through
attention, so the trunk runs densely whatever the mask (docs/flops.md). Selecting whole windows
does save it. Per micro-batch of B drawn windows:

1. **instances**: an early exit (the first ``exit_layer`` blocks, the final LayerNorm and the tied
   head; no parameters of its own, no gradient) scores each window by its mean loss or entropy over
   ``score_positions`` positions (slm_cli/selection/instances.py); the ⌈(1 − window_alpha)·B⌉
   windows at or above the windows' value-at-risk at ``window_alpha`` are kept (ties towards the
   lower row), the risk-averse choice of ESLM one level up;
2. **tokens**: inside the kept windows, ESLM as usual: the ⌈(1 − alpha)·M⌉ tokens at or above the
   VaR at ``alpha`` of the kept windows' M tokens.

Only the kept windows run the full forward and backward; a dropped window costs its early exit.
The step's batch is the windows drawn (data.batch_size, data.global_batch_size and
trainer.max_tokens count drawn windows and tokens); the summary and logs give the tokens drawn
(train_tokens), run forward and backward (forward_tokens) and trained on (selected_tokens).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from slm_cli.config import positive_int_or_null
from slm_cli.errors import SlmError
from slm_cli.model.gpt import GPTConfig
from slm_cli.selection.base import Selected, check_fraction, keep_count, top_k_mask
from slm_cli.selection.eslm import ESLM


class HierESLM(ESLM):
    name = "hier_eslm"

    def __init__(self, name: str = "hier_eslm", score: str = "loss", alpha: float = 0.4,
                 window_alpha: float = 0.5, exit_layer: int | None = None, score_positions: int | None = 64) -> None:
        super().__init__(name=name, score=score, alpha=alpha)
        self.window_alpha = check_fraction("selection.window_alpha", window_alpha)
        self.exit_layer_setting = positive_int_or_null("selection.exit_layer", exit_layer, example=3)
        self.score_positions = positive_int_or_null("selection.score_positions", score_positions, example=64)
        self.exit_layer = self.exit_layer_setting or 1  # settled by configure(), once the model is known

    def configure(self, model: GPTConfig) -> None:
        """exit_layer=null is a quarter of the model's blocks (at least one); at most all of them."""
        layer = self.exit_layer_setting or max(1, model.n_layer // 4)
        if layer > model.n_layer:
            raise SlmError(f"selection.exit_layer={layer} exceeds model.n_layer={model.n_layer}: the early exit "
                           f"runs at most every block, e.g. selection.exit_layer={max(1, model.n_layer // 4)}")
        self.exit_layer = layer

    def select_windows(self, features: Mapping[str, Tensor]) -> Selected:
        scores = features[self.score]
        mask, threshold = top_k_mask(scores, keep_count(1.0 - self.window_alpha, scores.numel()))
        return Selected(mask=mask, metrics={"window_threshold": threshold})

    def window_keep_fraction(self) -> float:
        return 1.0 - self.window_alpha
