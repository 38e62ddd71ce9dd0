"""A training step's accounting: what its micro-batches report, summed over devices, becomes the
run's counters, its FLOPs (slm_cli/flops.py) and the metrics it logs.

The same words name the same figures in the logs, summary.json and docs/outputs.md: tokens drawn
from the corpus (``train_tokens``), run through the full forward and backward (``forward_tokens``:
fewer than drawn only with instance-level selection), and trained on (``selected_tokens``); FLOPs
realised (what slm executes), nominal (the papers' accounting) and CLM-equivalent (every drawn
token trained densely). The realised saving is the headline; the nominal one stands beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from slm_cli import flops
from slm_cli.model.gpt import GPTConfig
from slm_cli.selection.base import Selection
from slm_cli.selection.instances import exit_positions
from slm_cli.selection.scope import Scope
from slm_cli.target.base import Target

COUNTERS = ("train_tokens", "forward_tokens", "selected_tokens", "flops_nominal", "flops_realized", "flops_clm")


@dataclass
class MicroResult:
    """What one micro-batch reports besides its differentiable loss."""

    loss: Tensor  # () detached: this micro-batch's share of the step's loss on this device
    token_loss: Tensor  # (M,) detached per-token CE of the tokens run forward (train/loss_all)
    drawn: int  # tokens drawn for this micro-batch (before instance selection)
    selected: Tensor  # () tokens with nonzero loss weight
    features: dict[str, Tensor]  # the strategy's features of these tokens (for its step update)
    metrics: dict[str, float] = field(default_factory=dict)  # the selection's, logged as selection/<key>


@dataclass
class StepCounts:
    """One step's figures summed over devices (metrics: averaged over micro-batches and devices)."""

    tokens: int
    forward_tokens: int
    selected: int
    loss: float  # the step's loss: the mean over devices of each device's share
    loss_all: float  # mean per-token CE over every token run forward
    metrics: dict[str, float]


def step_counts(micro: list[MicroResult], reduce_sum: Callable[[Tensor], Tensor], world_size: int) -> StepCounts:
    """One all-reduce (float64) of the step's counts and of the selection's metrics."""
    keys = sorted(micro[0].metrics)
    device = micro[0].loss.device

    def f64(value: float) -> Tensor:
        return torch.tensor(float(value), dtype=torch.float64, device=device)

    local = torch.stack([
        f64(sum(m.drawn for m in micro)),
        f64(sum(m.token_loss.numel() for m in micro)),
        sum(m.selected.double() for m in micro),
        sum(m.token_loss.double().sum() for m in micro),
        sum(m.loss.double() for m in micro),
        *[f64(sum(m.metrics[k] for m in micro) / len(micro)) for k in keys],
    ])
    values = reduce_sum(local).tolist()
    return StepCounts(tokens=round(values[0]), forward_tokens=round(values[1]), selected=round(values[2]),
                      loss=values[4] / world_size, loss_all=values[3] / max(values[1], 1.0),
                      metrics={k: v / world_size for k, v in zip(keys, values[5:], strict=True)})


class Counters:
    """The run's cumulative counters, saved in checkpoints so that a resumed run continues them."""

    def __init__(self) -> None:
        self.values: dict[str, float] = dict.fromkeys(COUNTERS, 0)

    def add(self, counts: StepCounts, step: flops.StepFlops) -> None:
        self.values["train_tokens"] += counts.tokens
        self.values["forward_tokens"] += counts.forward_tokens
        self.values["selected_tokens"] += counts.selected
        self.values["flops_nominal"] += step.nominal
        self.values["flops_realized"] += step.realized
        self.values["flops_clm"] += step.clm

    def state_dict(self) -> dict[str, float]:
        return dict(self.values)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.values.update(state)
        if "forward_tokens" not in state:  # a checkpoint from before instance selection ran every token
            self.values["forward_tokens"] = self.values["train_tokens"]

    def __getitem__(self, key: str) -> float:
        return self.values[key]


def step_metrics(counts: StepCounts, counters: Counters, grad_norm: Tensor, lr: float,
                 adapted: Mapping[str, float], windows: bool) -> dict[str, Any]:
    """What a step logs (train/loss is logged apart, on the progress bar)."""
    c = counters
    metrics: dict[str, Any] = {
        "train/loss_all": counts.loss_all,
        "train/selected_frac": counts.selected / counts.tokens,
        "train/grad_norm": grad_norm,
        "lr": lr,
        "flops/realized": c["flops_realized"],
        "flops/nominal": c["flops_nominal"],
        "flops/saved_frac_realized": flops.saved_frac(c["flops_realized"], c["flops_clm"]),
        "flops/saved_frac_nominal": flops.saved_frac(c["flops_nominal"], c["flops_clm"]),
    }
    if windows:  # instance-level selection: the share of drawn tokens run forward and backward
        metrics["train/forward_frac"] = counts.forward_tokens / counts.tokens
    metrics.update({f"selection/{k}": v for k, v in {**counts.metrics, **adapted}.items()})
    return metrics


def step_cost(cfg: GPTConfig, selection: Selection, target: Target | None, scope: Scope, *, keep_probs: bool,
              tokens: int, forward_tokens: int, selected: int) -> flops.StepFlops:
    """A step's FLOPs from its counts (summed over devices): what the training step logs and the
    dry-run plan (slm_cli/estimate.py) predicts, from one function. Instance selection adds its
    early exit on every drawn window; extra forwards (an online reference, a teacher) run on the
    tokens run forward."""
    early_exit = 0.0
    positions = exit_positions(selection, cfg.block_size)
    if positions is not None:
        per_window = flops.early_exit_flops_per_window(cfg, selection.exit_layer, len(positions))
        early_exit = tokens // cfg.block_size * per_window
    extra = selection.extra_forward_flops(forward_tokens)
    if target is not None:
        extra += target.extra_forward_flops(forward_tokens)
    return flops.step_flops(cfg, tokens, selected, forward_tokens=forward_tokens, keep_probs=keep_probs,
                            extra_forward=extra, scoring_pass=scope.scoring_pass(), early_exit=early_exit)
