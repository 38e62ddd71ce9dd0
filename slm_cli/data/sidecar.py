"""Folders of files committed as one: a prepared corpus, and the per-token folders written beside its
train.bin (reference losses for RHO-1, n-gram top-r arrays for CoCoNTs).

Every such folder follows one protocol, implemented here once:

- *write*: :func:`staged` removes the folder's ``meta.json`` first (from then on the folder is "not
  there"), lets the caller write every file into a temporary folder inside it, and moves the files
  into place; :func:`commit` then writes ``meta.json`` atomically. A folder with a ``meta.json`` is
  therefore always complete, and an interrupted write leaves a folder that readers refuse.
- *read*: :func:`read_meta` parses ``meta.json`` and checks its keys, so a damaged file is one line
  naming the folder and the fix; :func:`check_same_corpus` and :func:`load_array` check that
  per-token arrays belong to exactly this corpus and tokenizer.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slm_cli.errors import SlmError
from slm_cli.outputs import write_json

if TYPE_CHECKING:
    from slm_cli.data.prepared import PreparedData

META = "meta.json"


@contextlib.contextmanager
def staged(folder: Path, files: Iterable[str]) -> Iterator[Path]:
    """Yield a temporary folder inside ``folder`` for the caller to write ``files`` into; on
    success move them into ``folder``. ``folder``'s meta.json is removed first: an old meta.json
    must never bless new files. Call :func:`commit` afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / META).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".staged-") as tmp:
        yield Path(tmp)
        for name in files:
            os.replace(Path(tmp) / name, folder / name)


def commit(folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``folder``'s meta.json atomically: the commit of the files :func:`staged` moved in."""
    write_json(folder / META, meta)
    return meta


def read_meta(folder: Path, keys: Iterable[str], fix: str,
              check: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """``folder``'s meta.json, with every key of ``keys``; ``check`` may raise ValueError for
    further rules. A missing, unparsable or incomplete file is an SlmError ending with ``fix``."""
    path = folder / META
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        missing = [k for k in keys if k not in meta]
        if missing:
            raise ValueError(f"missing keys {', '.join(missing)}")
        if check is not None:
            check(meta)
    except FileNotFoundError:
        raise SlmError(f"{path} does not exist: {fix}") from None
    except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise SlmError(f"corrupt {META} ({str(e).splitlines()[0]}) in {folder}: {fix}") from None
    return meta


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
