"""Random: a uniform random subset of the tokens, the ablation every selection paper needs.

It trains on as many tokens as a scored strategy at the same keep ratio, but picks them blindly,
so a gain over Random is due to *which* tokens are chosen, not to how many.

The draw is a pure function of the tokens it selects among: a generator seeded with a hash of
their stream positions. So it is reproducible and resumes exactly with no saved state; each
micro-batch draws its own subset (their positions differ) rather than every device keeping the
same in-batch positions, and under trainer.selection_scope=global_batch every device draws the
same subset of the gathered global batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from slm_cli.loss import TokenStats
from slm_cli.selection.base import Selected, Selection, check_fraction, keep_count


def positions_seed(positions: Tensor) -> int:
    """A 63-bit seed from the exact sequence of stream positions."""
    data = np.ascontiguousarray(positions.detach().cpu().numpy().astype(np.int64))
    return int.from_bytes(hashlib.blake2b(data.tobytes(), digest_size=8).digest(), "little") >> 1


class Random(Selection):
    name = "random"
    reads_model = False

    def __init__(self, name: str = "random", ratio: float = 0.6) -> None:
        self.name = name
        self.ratio = check_fraction("selection.ratio", ratio)

    def features(self, stats: TokenStats | None, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {"positions": batch["positions"].reshape(-1)}

    def select(self, features: Mapping[str, Tensor]) -> Selected:
        positions = features["positions"]
        m = positions.numel()
        generator = torch.Generator().manual_seed(positions_seed(positions))
        kept = torch.randperm(m, generator=generator)[: keep_count(self.ratio, m)]
        mask = torch.zeros(m, dtype=torch.bool)
        mask[kept] = True
        return Selected(mask=mask.to(positions.device))

    def keep_fraction(self) -> float:
        return self.ratio
