"""CLM: the causal-language-modelling baseline; every token is trained on."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from slm_cli.selection.base import Selected, Selection


class CLM(Selection):
    name = "clm"

    def __init__(self, name: str = "clm") -> None:
        self.name = name

    def select(self, features: Mapping[str, Tensor]) -> Selected:
        return Selected(mask=torch.ones_like(features["loss"], dtype=torch.bool))
