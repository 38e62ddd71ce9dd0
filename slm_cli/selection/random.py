"""Random: a uniform random subset of the tokens, the ablation every selection paper needs.

It trains on as many tokens as a scored strategy at the same keep ratio, but picks them blindly,
so a gain over Random is due to *which* tokens are chosen, not to how many.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from slm_cli.selection.base import Selected, Selection, check_fraction, keep_count


class Random(Selection):
    name = "random"

    def __init__(self, name: str = "random", ratio: float = 0.6) -> None:
        self.name = name
        self.ratio = check_fraction("selection.ratio", ratio)

    def select(self, features: Mapping[str, Tensor]) -> Selected:
        loss = features["loss"]
        m = loss.numel()
        # Drawn from torch's global CPU generator whatever the device: its state is saved in
        # checkpoints (module.on_save_checkpoint), so a resumed run draws the same subsets; every
        # device draws the same permutation of the global batch (same seed, same draws).
        kept = torch.randperm(m)[: keep_count(self.ratio, m)]
        mask = torch.zeros(m, dtype=torch.bool)
        mask[kept] = True
        return Selected(mask=mask.to(loss.device))
