"""Where a strategy selects (trainer.selection_scope; docs/scaling.md). The strategy
(slm_cli/selection/*.py) only maps features to a mask; a scope decides which tokens one selection
ranks together and what a selected token weighs, so that every strategy behaves the same on any
number of devices by construction.

- ``micro_batch`` (default): each micro-batch selects among its own tokens, inside its own forward:
  no second pass and nothing gathered. A selected token weighs 1/(|S_k|·A), |S_k| its micro-batch's
  selection and A the micro-batches per step on this device; DDP and FSDP average over devices.
  Rank r's micro-batch k holds the same rows of the global batch as micro-batch r·A + k of one
  process (StepSampler), so for a given ``data.batch_size`` the same tokens are selected and the
  update is the same whatever the devices and accumulation. The ranking is over B·T tokens.
- ``global_batch``: one selection over the whole global batch, every micro-batch on every device,
  from features gathered across devices; a selected token weighs world_size/|S| with |S| counted
  over the global batch, so the update is the one a single device computes on the whole batch,
  whatever the split. With one micro-batch per step the features are gathered inside the forward;
  with several, every micro-batch must be scored before the first backward, which for a strategy
  that reads the model is a forward pass without gradients over the whole batch (F/3 FLOPs per
  token, counted in realised FLOPs: :meth:`Scope.scoring_pass`).

Adaptive state (Ada-ESLM's α) is updated once per step from the whole global batch's features
(:meth:`Scope.step_features`), so every device holds the same state under either scope.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from slm_cli.config import SCOPES
from slm_cli.errors import SlmError
from slm_cli.loss import model_token_stats
from slm_cli.selection.base import Selection, keep_count

Features = dict[str, Tensor]


class Devices(NamedTuple):
    """The data-parallel layout of this step: this rank, how many, and an all-gather."""

    rank: int
    world_size: int
    all_gather: Callable[[Tensor], Tensor]


ONE_DEVICE = Devices(0, 1, lambda t: t)


@dataclass
class Choice:
    """One micro-batch's selection on this device: which tokens, and what each selected one weighs."""

    mask: Tensor  # (M,) bool over the micro-batch's flat tokens
    scale: Tensor  # () the loss weight of a selected token
    metrics: dict[str, float]


def gather(features: Mapping[str, Tensor], devices: Devices) -> Features:
    """Features of every device, concatenated in rank order: rank r holds rows [r·b, (r+1)·b) of
    the global batch (StepSampler), so this is the global batch's order, as on one device."""
    if devices.world_size == 1:
        return dict(features)
    return {k: devices.all_gather(v.contiguous()).reshape(-1) for k, v in features.items()}


def concat(features: list[Features]) -> Features:
    return {k: torch.cat([f[k] for f in features]) for k in features[0]}


class Scope:
    """Base class: one selection per micro-batch or per global batch; see the module docstring."""

    name = "base"

    def __init__(self, selection: Selection, accumulate: int) -> None:
        self.selection = selection
        self.accumulate = accumulate

    def scoring_pass(self) -> bool:
        """Whether a step runs the model forward once more, without gradients, to score the batch."""
        return False

    def start_step(self, model: nn.Module, micro: list[Features], devices: Devices, chunk_size: int) -> None:
        """Called before the step's first micro-batch (the global scope plans its selection here)."""

    def choose(self, index: int, features: Features, devices: Devices) -> Choice:
        """The selection of micro-batch ``index`` of this step, from its features (made in its forward)."""
        raise NotImplementedError

    def selected_per_step(self, micro_tokens: int, micro_batches: int, keep: float) -> int:
        """Tokens a step trains on at keep fraction ``keep`` when each of its ``micro_batches``
        micro-batches (every device's) runs ``micro_tokens`` tokens forward: the dry-run plan's count."""
        raise NotImplementedError

    def step_features(self, micro_features: list[Features], devices: Devices) -> Features:
        """The whole global batch's features (every micro-batch on every device), for
        :meth:`Selection.update`; {} for a strategy that does not adapt (nothing is gathered)."""
        if not self.selection.adapts:
            return {}
        return gather(concat(micro_features), devices)


class MicroBatch(Scope):
    name = "micro_batch"

    def choose(self, index: int, features: Features, devices: Devices) -> Choice:
        selected = self.selection.select(features)
        scale = 1.0 / (selected.mask.sum().clamp_min(1) * self.accumulate)
        return Choice(selected.mask, scale, selected.metrics)

    def selected_per_step(self, micro_tokens: int, micro_batches: int, keep: float) -> int:
        return micro_batches * keep_count(keep, micro_tokens)


class GlobalBatch(Scope):
    name = "global_batch"

    def __init__(self, selection: Selection, accumulate: int) -> None:
        super().__init__(selection, accumulate)
        self._planned: list[Choice] | None = None
        self._features: Features = {}  # the global batch's, as selected on

    def scoring_pass(self) -> bool:
        return self.accumulate > 1 and self.selection.reads_model

    def start_step(self, model: nn.Module, micro: list[Features], devices: Devices, chunk_size: int) -> None:
        """With several micro-batches, the whole step's selection is made before any backward: from
        the batch alone for a strategy that does not read the model (CLM, random), else after a
        scoring pass. Keeping every micro-batch's graph instead would cost accumulate × the
        activation memory, which is what accumulation exists to avoid."""
        self._planned = None
        if len(micro) == 1:
            return  # selected inside the forward (choose), from the features gathered there
        if self.selection.reads_model:
            features = [self.selection.features(model_token_stats(
                model, mb["input_ids"], mb["labels"], entropy=self.selection.needs_entropy, chunk_size=chunk_size),
                mb) for mb in micro]
        else:
            features = [self.selection.features(None, mb) for mb in micro]
        self._planned = self._select(features, devices)

    def choose(self, index: int, features: Features, devices: Devices) -> Choice:
        if self._planned is None:
            return self._select([features], devices)[0]
        return self._planned[index]

    def step_features(self, micro_features: list[Features], devices: Devices) -> Features:
        return self._features if self.selection.adapts else {}

    def selected_per_step(self, micro_tokens: int, micro_batches: int, keep: float) -> int:
        return keep_count(keep, micro_tokens * micro_batches)

    def _select(self, features: list[Features], devices: Devices) -> list[Choice]:
        """One selection over this device's micro-batches and every other device's."""
        local = concat(features)
        self._features = everyone = gather(local, devices)
        selected = self.selection.select(everyone)
        m = next(iter(local.values())).numel()
        mine = selected.mask[devices.rank * m : (devices.rank + 1) * m]
        scale = devices.world_size / selected.mask.sum().clamp_min(1)  # a tensor: no host sync here
        sizes = [next(iter(f.values())).numel() for f in features]
        return [Choice(mask, scale, selected.metrics) for mask in mine.split(sizes)]


def build_scope(name: str, selection: Selection, accumulate: int) -> Scope:
    """The scope named by trainer.selection_scope."""
    scopes = {MicroBatch.name: MicroBatch, GlobalBatch.name: GlobalBatch}
    if name not in scopes:
        raise SlmError(f"trainer.selection_scope={name} is not known: use one of {', '.join(SCOPES)}")
    if name != MicroBatch.name and selection.exit_layer is not None:
        raise SlmError(f"selection={selection.name} keeps windows per micro-batch: set "
                       f"trainer.selection_scope={MicroBatch.name}")
    return scopes[name](selection, accumulate)
