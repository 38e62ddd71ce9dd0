"""Where a strategy selects: over the whole global batch, across devices and micro-batches, or over
one micro-batch (selection.scope; docs/scaling.md). The strategy itself (slm_cli/selection/*.py)
only maps features to a mask; this module decides which features it sees and what a selected
token weighs, so that every strategy is correct on any number of devices by construction.

- ``global`` (default): one selection over the global batch, every micro-batch on every device,
  from features gathered across devices; each selected token weighs world_size / |S| with |S|
  counted over the global batch (DDP and FSDP average gradients over devices), so the update is
  the one a single device computes on the whole batch. With one micro-batch per step the
  features are gathered inside the forward; with several, a forward without gradients scores
  them all first (:meth:`Planner.score`).
- ``local``: each micro-batch selects on its own and is a mean over its own selection; the step
  averages micro-batches and devices. No extra pass and no gathering (except for adaptive state).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from slm_cli.loss import token_stats
from slm_cli.selection.base import Selection


@dataclass
class StepSelection:
    """A selection: over the whole global batch (scope=global), or over one micro-batch (local)."""

    masks: list[Tensor]  # this device's mask of each micro-batch
    scale: Tensor  # weight of a selected token: world_size / |S| (DDP and FSDP average over devices)
    features: dict[str, Tensor]  # the features selected on (global batch; local scope: the micro-batch)
    metrics: dict[str, float]


class Devices(NamedTuple):
    """The data-parallel layout of this step: this rank, how many, and an all-gather."""

    rank: int
    world_size: int
    all_gather: Callable[[Tensor], Tensor]


class Planner:
    def __init__(self, selection: Selection, scope: str, accumulate: int, chunk_size: int) -> None:
        self.selection = selection
        self.scope = scope
        self.accumulate = accumulate
        self.chunk_size = chunk_size

    def gather(self, features: dict[str, Tensor], devices: Devices) -> dict[str, Tensor]:
        """Features of every device, concatenated in rank order: rank r holds rows [r·b, (r+1)·b)
        of the global batch (StepSampler), so this is the global batch's order, as on one device."""
        if devices.world_size == 1:
            return features
        return {k: devices.all_gather(v.contiguous()).reshape(-1) for k, v in features.items()}

    def select_global(self, features: list[dict[str, Tensor]], devices: Devices) -> StepSelection:
        """One selection over the features of this device's micro-batches and every other device's."""
        local = {k: torch.cat([f[k] for f in features]) for k in features[0]}
        everyone = self.gather(local, devices)
        selected = self.selection.select(everyone)
        m = _rows(local)
        mine = selected.mask[devices.rank * m : (devices.rank + 1) * m]
        count = selected.mask.sum().clamp_min(1)  # a tensor: no host sync here
        return StepSelection(masks=list(mine.split([_rows(f) for f in features])),
                             scale=devices.world_size / count, features=everyone, metrics=selected.metrics)

    def select_local(self, features: dict[str, Tensor]) -> StepSelection:
        """scope=local: this micro-batch alone, a mean over its own selection; the step averages
        the micro-batches (here) and the devices (DDP/FSDP)."""
        selected = self.selection.select(features)
        scale = 1.0 / (selected.mask.sum().clamp_min(1) * self.accumulate)
        return StepSelection(masks=[selected.mask], scale=scale, features=features, metrics=selected.metrics)

    def select(self, features: dict[str, Tensor], devices: Devices) -> StepSelection:
        """A selection made inside the forward of one micro-batch (no scoring pass)."""
        return self.select_global([features], devices) if self.scope == "global" else self.select_local(features)

    def plans_ahead(self, micro_batches: int) -> bool:
        """Global scope over several micro-batches must see every micro-batch's features before
        the first backward."""
        return self.scope == "global" and micro_batches > 1

    def needs_scoring_pass(self, micro_batches: int) -> bool:
        """Planning ahead costs a forward pass only for a strategy that reads the model."""
        return self.plans_ahead(micro_batches) and self.selection.reads_model

    def plan(self, model: nn.Module, micro: list[dict[str, Tensor]], devices: Devices) -> StepSelection:
        """The step's selection made before any backward: from the batch alone for a strategy that
        does not read the model (CLM, random), else after a scoring pass (:meth:`score`)."""
        if not self.selection.reads_model:
            return self.select_global([self.selection.features(None, mb) for mb in micro], devices)
        return self.score(model, micro, devices)

    def score(self, model: nn.Module, micro: list[dict[str, Tensor]], devices: Devices) -> StepSelection:
        """scope=global with several micro-batches: a forward pass without gradients over every
        micro-batch gives the features, so that one selection can see the whole global batch
        before any backward. It costs one extra forward per step (counted in realised FLOPs);
        keeping every micro-batch's graph instead would cost accumulate_grad_batches × the
        activation memory, which is what accumulation exists to avoid."""

        def head(hidden: Tensor, weight: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
            stats = token_stats(hidden.reshape(-1, hidden.shape[-1]), weight, batch["labels"].reshape(-1),
                                chunk_size=self.chunk_size, entropy=self.selection.needs_entropy, keep_probs=False)
            return self.selection.features(stats, batch)

        with torch.no_grad():
            features = [model(mb["input_ids"], head=lambda h, w, mb=mb: head(h, w, mb)) for mb in micro]
        return self.select_global(features, devices)


def _rows(features: dict[str, Tensor]) -> int:
    return next(iter(features.values())).numel()
