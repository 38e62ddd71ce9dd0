"""Per-token arrays stored beside a prepared corpus's train.bin (reference losses for RHO-1, n-gram
top-r arrays for CoCoNTs): the checks that they belong to exactly this corpus and tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from slm_cli.data.prepare import PreparedData
from slm_cli.errors import SlmError


def check_same_corpus(meta: dict[str, Any], prepared: PreparedData, subject: str, again: str,
                      tokenizer_fix: str = "") -> None:
    """`subject` (e.g. "reference losses in <folder> were computed") must describe this corpus's
    tokens: the same corpus fingerprint and tokenizer as prepared.meta."""
    if meta["fingerprint"] != prepared.meta["fingerprint"]:
        raise SlmError(f"{subject} for another version of the corpus than {prepared.dir} (fingerprint "
                       f"{meta['fingerprint'][:8]} != {prepared.meta['fingerprint'][:8]}): {again}")
    if meta["tokenizer_sha256"] != prepared.meta["tokenizer_sha256"]:
        raise SlmError(f"{subject} with another tokenizer than {prepared.dir}'s: {again}{tokenizer_fix}")


def load_array(path: Path, shape: tuple[int, ...], dtype: np.dtype, again: str, meta_tokens: int) -> np.ndarray:
    """Memory-map an .npy array and check its shape and dtype (and meta.json's token count)."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise SlmError(f"cannot read {path} ({str(e).splitlines()[0]}): {again}") from None
    if array.shape != shape or meta_tokens != shape[0] or array.dtype != dtype:
        need = "(" + ", ".join(f"{d:,}" for d in shape) + ")"
        raise SlmError(f"{path} holds {array.dtype} {array.shape} (meta.json: {meta_tokens:,} tokens) but the "
                       f"prepared corpus needs {dtype} {need}: {again}")
    return array
