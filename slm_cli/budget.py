"""The run's budget, resolved from the config before anything is built: how the global batch splits
over devices and micro-batches, how many steps a token budget means, and which accelerator and
precision `auto` picks on this machine.

The global batch is what the method sees (one selection over it; docs/scaling.md), so it is the
quantity to hold fixed across hardware: with ``data.global_batch_size`` set, the accumulation is
derived from ``data.batch_size × devices × nodes`` instead of being recomputed by hand.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from omegaconf import DictConfig, open_dict

from slm_cli.config import is_int, is_number
from slm_cli.errors import SlmError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    micro_batch: int  # windows per device per micro-batch (data.batch_size)
    accumulate: int  # micro-batches per optimizer step
    world_size: int  # devices × nodes
    global_batch: int  # windows per optimizer step
    tokens_per_step: int
    max_steps: int

    @property
    def total_tokens(self) -> int:
        return self.tokens_per_step * self.max_steps


def resolve(cfg: DictConfig) -> Budget:
    """The budget of ``cfg``, from data.global_batch_size / trainer.max_tokens where set."""
    t, data = cfg.trainer, cfg.data
    world = int(t.devices) * int(t.num_nodes)
    micro = int(data.batch_size)
    accumulate = int(t.accumulate_grad_batches)
    gbs = data.get("global_batch_size")
    if gbs is not None:
        per_pass = micro * world
        if not is_int(gbs) or gbs < 1 or gbs % per_pass:
            raise SlmError(f"data.global_batch_size={gbs} is not a multiple of data.batch_size × devices × nodes = "
                           f"{micro} × {t.devices} × {t.num_nodes} = {per_pass}: choose a multiple of {per_pass}, "
                           "or change data.batch_size")
        derived = gbs // per_pass
        if accumulate not in (1, derived):
            raise SlmError(f"data.global_batch_size={gbs} needs trainer.accumulate_grad_batches={derived} on "
                           f"{world} device(s) with data.batch_size={micro}, but it is set to {accumulate}: "
                           "set only one of the two")
        accumulate = derived
    global_batch = micro * accumulate * world
    tokens_per_step = global_batch * int(cfg.model.block_size)
    max_steps = int(t.max_steps)
    max_tokens = t.get("max_tokens")
    if max_tokens is not None:
        if not is_number(max_tokens) or max_tokens <= 0:
            raise SlmError(f"trainer.max_tokens={max_tokens} must be a positive number of tokens: e.g. "
                           "trainer.max_tokens=1e9, or null to train for trainer.max_steps")
        max_steps = math.ceil(max_tokens / tokens_per_step)
    return Budget(micro, accumulate, world, global_batch, tokens_per_step, max_steps)


def apply(cfg: DictConfig) -> Budget:
    """Resolve the budget and write it back into ``cfg`` (trainer.accumulate_grad_batches,
    trainer.max_steps), so every later reader, the saved config and the logs agree."""
    budget = resolve(cfg)
    t = cfg.trainer
    if budget.accumulate != t.accumulate_grad_batches or budget.max_steps != t.max_steps:
        log.info(f"budget: global batch {budget.global_batch} windows = {budget.micro_batch} × "
                 f"{budget.accumulate} micro-batches × {budget.world_size} device(s), {budget.tokens_per_step:,} "
                 f"tokens per step, {budget.max_steps:,} steps ({budget.total_tokens:,} tokens)")
    with open_dict(cfg):
        t.accumulate_grad_batches = budget.accumulate
        t.max_steps = budget.max_steps
    return budget


def resolve_hardware(cfg: DictConfig) -> None:
    """trainer.accelerator=auto and trainer.precision=auto (trainer=ddp and fsdp) become what this
    machine has: a CUDA GPU with bf16-mixed (16-mixed without bf16 support), else the CPU with
    32-true. Said in one log line."""
    import torch

    t = cfg.trainer
    if t.accelerator != "auto" and t.precision != "auto":
        return
    cuda = torch.cuda.is_available()
    accelerator = t.accelerator if t.accelerator != "auto" else ("gpu" if cuda else "cpu")
    on_gpu = accelerator in ("gpu", "cuda")
    if t.precision == "auto":
        precision = ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed") if on_gpu else "32-true"
    else:
        precision = t.precision
    log.info(f"trainer: accelerator={accelerator} precision={precision} (auto, "
             f"{'a CUDA GPU' if cuda else 'no CUDA GPU'} on this machine)")
    with open_dict(cfg):
        t.accelerator, t.precision = accelerator, precision
