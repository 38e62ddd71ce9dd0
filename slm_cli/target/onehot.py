"""The one-hot next-token target: plain cross-entropy (the default)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from slm_cli.loss import SparseTargets
from slm_cli.target.base import Target


class OneHot(Target):
    name = "onehot"

    def __init__(self, name: str = "onehot") -> None:
        self.name = name

    def targets(self, batch: Mapping[str, Tensor]) -> SparseTargets | None:
        return None
