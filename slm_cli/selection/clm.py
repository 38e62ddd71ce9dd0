"""CLM: the causal-language-modelling baseline; every token is trained on."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from slm_cli.loss import TokenStats
from slm_cli.selection.base import Selected, Selection


class CLM(Selection):
    name = "clm"
    reads_model = False

    def __init__(self, name: str = "clm") -> None:
        self.name = name

    def features(self, stats: TokenStats | None, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {"positions": batch["positions"].reshape(-1)}  # only the count matters

    def select(self, features: Mapping[str, Tensor]) -> Selected:
        return Selected(mask=torch.ones_like(features["positions"], dtype=torch.bool))
