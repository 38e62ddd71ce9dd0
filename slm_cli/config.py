"""Checks on the composed config, run before any work starts.

Hydra already rejects unknown groups, options and keys (the config is in struct mode). What it cannot
know is which *values* make sense; those are checked here so that a wrong value fails in a second
with one line naming the key and the fix, not an hour into a run.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from omegaconf import DictConfig

from slm_cli.errors import SlmError

SCOPES = ("micro_batch", "global_batch")  # trainer.selection_scope: see slm_cli/selection/scope.py
# data.encoding_errors: what reading .txt/.jsonl files does with bytes that are not UTF-8 (the
# `errors=` of Python's decode; see slm_cli/data/sources.py).
ENCODING_ERRORS = ("strict", "replace", "ignore")


def _check(ok: bool, key: str, value: Any, rule: str, fix: str) -> None:
    if not ok:
        raise SlmError(f"{key}={value} {rule}: {fix}")


# ---- the shared predicates: every value check in slm goes through these --------------------------
def is_int(value: Any) -> bool:
    """An integer (Python's or numpy's), not a bool (YAML's true/false are ints to Python)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def fraction(key: str, value: Any, *, closed: bool = False, example: str = "0.6") -> float:
    """A share in (0, 1), or in [0, 1] when ``closed``; else an SlmError naming ``key``."""
    ok = is_number(value) and (0 <= value <= 1 if closed else 0 < value < 1)
    _check(ok, key, value, f"must be in {'[0, 1]' if closed else '(0, 1)'}", f"e.g. {key}={example}")
    return float(value)


def positive_int_or_null(key: str, value: Any, example: int = 512) -> int | None:
    _check(value is None or (is_int(value) and value > 0), key, value, "must be a positive integer or null",
           f"e.g. {key}={example}")
    return None if value is None else int(value)


def positive_int(section: DictConfig, prefix: str, key: str, fix: str) -> None:
    value = section[key]
    _check(is_int(value) and value > 0, f"{prefix}.{key}", value, "must be a positive integer", fix)


def check_data(data: DictConfig) -> None:
    positive_int(data, "data", "batch_size", "pass e.g. data.batch_size=16")
    # data.source, data.sample_by and the source's own keys are checked where they are read
    # (slm_cli/data/sources.py).
    vf = data.val_fraction
    _check(is_number(vf) and 0 < vf < 1, "data.val_fraction", vf, "must be in (0, 1)", "e.g. data.val_fraction=0.05")
    if data.tokenizer == "bpe":
        v = data.vocab_size
        _check(is_int(v) and 257 <= v <= 2**32 - 1, "data.vocab_size", v, "must be an integer >= 257 (256 bytes + EOS)",
               "e.g. data.vocab_size=4096")
    if data.max_bytes is not None:
        positive_int(data, "data", "max_bytes", "pass a positive byte count or null")
    _check(is_int(data.num_workers) and data.num_workers >= 0, "data.num_workers", data.num_workers,
           "must be an integer >= 0", "e.g. data.num_workers=0")
    errors = data.get("encoding_errors", "strict")
    _check(errors in ENCODING_ERRORS, "data.encoding_errors", errors, "is unknown",
           "use one of strict, replace, ignore")


def check_model(model: DictConfig) -> None:
    for key in ("block_size", "n_layer", "n_head", "n_embd"):
        positive_int(model, "model", key, f"pass a positive integer for model.{key}")
    _check(model.n_embd % model.n_head == 0, "model.n_embd", model.n_embd,
           f"is not divisible by model.n_head={model.n_head}", "choose n_embd = n_head * head_dim")
    _check(is_number(model.dropout) and 0 <= model.dropout < 1, "model.dropout", model.dropout,
           "must be in [0, 1)", "e.g. model.dropout=0.0")
    if model.vocab_size is not None:
        positive_int(model, "model", "vocab_size", "or leave model.vocab_size=null to use the tokenizer's")


def check_optim(optim: DictConfig) -> None:
    _check(is_number(optim.lr) and optim.lr > 0, "optim.lr", optim.lr, "must be > 0", "pass e.g. optim.lr=6e-4")
    _check(is_number(optim.weight_decay) and optim.weight_decay >= 0, "optim.weight_decay", optim.weight_decay,
           "must be >= 0", "e.g. optim.weight_decay=0.1")
    _check(is_int(optim.warmup_steps) and optim.warmup_steps >= 0, "optim.warmup_steps", optim.warmup_steps,
           "must be an integer >= 0", "e.g. optim.warmup_steps=100")
    _check(is_number(optim.min_lr_ratio) and 0 <= optim.min_lr_ratio <= 1, "optim.min_lr_ratio",
           optim.min_lr_ratio, "must be in [0, 1]", "e.g. optim.min_lr_ratio=0.1")
    _check(is_number(optim.grad_clip) and optim.grad_clip >= 0, "optim.grad_clip", optim.grad_clip,
           "must be >= 0", "use 0 to disable clipping")
    if optim.decay_steps is not None:
        positive_int(optim, "optim", "decay_steps", "or leave optim.decay_steps=null to decay until trainer.max_steps")
    betas = list(optim.betas)
    _check(len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas), "optim.betas", betas,
           "must be two numbers in [0, 1)", "e.g. optim.betas=[0.9,0.95]")


GPU_ACCELERATORS = ("gpu", "cuda")
GPU_PRECISIONS = ("16-mixed", "16-true", "16", "bf16-true")  # Lightning has no CPU path for these


def check_trainer(trainer: DictConfig) -> None:
    for key in ("max_steps", "accumulate_grad_batches", "val_check_interval", "limit_val_batches",
                "log_every_n_steps", "checkpoint_every_n_steps", "devices", "num_nodes"):
        positive_int(trainer, "trainer", key, f"pass a positive integer for trainer.{key}")
    start = trainer.selection_start_step
    _check(is_int(start) and start >= 0, "trainer.selection_start_step", start, "must be an integer >= 0",
           "e.g. trainer.selection_start_step=100 (0: select from the first step)")
    _check(isinstance(trainer.compile, bool), "trainer.compile", trainer.compile, "must be true or false",
           "e.g. trainer.compile=true")
    _check(isinstance(trainer.export_at_end, bool), "trainer.export_at_end", trainer.export_at_end,
           "must be true or false", "e.g. trainer.export_at_end=true")
    import torch

    if trainer.accelerator in GPU_ACCELERATORS and not torch.cuda.is_available():
        raise SlmError(f"trainer.accelerator={trainer.accelerator} but this machine has no CUDA GPU (torch "
                       f"{torch.__version__}): use trainer=cpu, or add trainer.accelerator=cpu "
                       "trainer.precision=32-true to trainer=ddp or trainer=fsdp")
    on_cpu = trainer.accelerator == "cpu" or (trainer.accelerator == "auto" and not torch.cuda.is_available())
    _check(not (on_cpu and str(trainer.precision) in GPU_PRECISIONS), "trainer.precision", trainer.precision,
           "needs a GPU", "on a CPU use trainer.precision=32-true (or bf16-mixed)")


def check_loss(loss: DictConfig) -> None:
    positive_int(loss, "loss", "chunk_size", "e.g. loss.chunk_size=4096")
    positive_int(loss, "loss", "max_target_mb", "e.g. loss.max_target_mb=2048")


def check_train(cfg: DictConfig) -> None:
    """All value checks for `slm train`."""
    check_data(cfg.data)
    check_model(cfg.model)
    check_optim(cfg.optim)
    check_trainer(cfg.trainer)
    check_loss(cfg.loss)
    _check(is_int(cfg.seed), "seed", cfg.seed, "must be an integer", "e.g. seed=1337")
    scope = cfg.trainer.selection_scope
    _check(scope in SCOPES, "trainer.selection_scope", scope, "is not known", f"use one of {', '.join(SCOPES)}")


def build(component_cfg: DictConfig) -> Any:
    """A strategy or target named by its YAML's `_target_`; its constructor checks its own values
    and raises SlmError, which Hydra's wrapping would hide, so it is re-raised as itself."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(component_cfg)
    except InstantiationException as exc:
        if isinstance(exc.__cause__, SlmError):
            raise exc.__cause__ from None
        raise
