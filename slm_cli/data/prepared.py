"""The on-disk format of a prepared corpus, which every reader and both builds need: flat
``train.bin`` / ``val.bin`` token streams (nanoGPT's layout), the ``tokenizer.json`` that made
them, and the ``meta.json`` that describes them and commits the folder (the protocol of
slm_cli/data/sidecar.py). Here are its one meta.json writer (:func:`prepared_meta`), its one .bin
writer (:class:`TokenWriter`), the folder's lock, and the reader with its checks.
The builds live in slm_cli/data/prepare.py (one corpus) and slm_cli/data/mixture.py (`data=mix`).
"""

from __future__ import annotations

import contextlib
import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slm_cli.data.sidecar import META, kill_point, read_meta
from slm_cli.data.tokenizer import tokenizer_sha256
from slm_cli.errors import SlmError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

FORMAT_VERSION = 1
SPLITS = ("train", "val")
FILES = ("train.bin", "val.bin", "tokenizer.json")  # what a build writes; meta.json commits them
META_KEYS = (
    "format_version", "name", "source", "fingerprint", "source_fingerprint", "tokenizer_sha256", "tokenizer",
    "vocab_size", "eos_id", "dtype", "train_tokens", "val_tokens", "documents", "settings", "created",
)  # fmt: skip
MIXTURE_KEY = "mixture"  # a mixture's sources: name, data, weight, dir, and their [start, end) per split
COPY_TOKENS = 1 << 24  # tokens converted and written at a time: bounded memory for any stream


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every token id."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


@dataclass
class PreparedData:
    """A prepared data folder: token streams, tokenizer and the ``meta.json`` describing them."""

    dir: Path
    meta: dict

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    @property
    def tokenizer_path(self) -> Path:
        return self.dir / "tokenizer.json"

    @property
    def source_names(self) -> list[str]:
        """A mixture's source names (slm_cli/data/mixture.py), in stream order; [] for one corpus."""
        return [s["name"] for s in self.meta.get(MIXTURE_KEY) or []]

    @property
    def source_weights(self) -> list[float]:
        return [float(s["weight"]) for s in self.meta.get(MIXTURE_KEY) or []]

    def spans(self, split: str) -> list[tuple[str, int, int]]:
        """A mixture's (name, start, end) token span per source in ``split``; [] for one corpus."""
        return [(s["name"], int(s[split][0]), int(s[split][1])) for s in self.meta.get(MIXTURE_KEY) or []]

    def tokens(self, split: str) -> np.memmap:
        """Read-only memmap of a split's token stream (opened lazily; cheap to call per worker)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        return np.memmap(
            self.dir / f"{split}.bin", dtype=self.dtype, mode="r", shape=(self.meta[f"{split}_tokens"],)
        )


# ---- writing ------------------------------------------------------------------------------------
def prepared_meta(folder: Path, *, source: str, fingerprint: str, source_fingerprint: str, tokenizer: Tokenizer,
                  tokenizer_spec: str, eos_id: int, counts: dict[str, int], documents: int, settings: dict[str, Any],
                  mixture: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The meta.json of a prepared folder, every key of :data:`META_KEYS` (and ``mixture`` for a mixture)."""
    vocab_size = tokenizer.get_vocab_size()
    meta = {
        "format_version": FORMAT_VERSION,
        "name": folder.name,
        "source": source,
        "fingerprint": fingerprint,
        "source_fingerprint": source_fingerprint,
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "tokenizer": tokenizer_spec,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "dtype": token_dtype(vocab_size).name,
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "documents": documents,
        "settings": settings,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return meta if mixture is None else {**meta, MIXTURE_KEY: mixture}


class TokenWriter:
    """A split's token stream, appended in order as ``dtype`` ids to ``path``: the one .bin writer of
    both builds. Plain buffered writes, not a memmap, so the written pages are not held in the
    process's memory."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path, self.dtype, self.tokens = path, np.dtype(dtype), 0
        self._file = open(path, "wb")  # noqa: SIM115 - closed by __exit__

    def write(self, tokens: np.ndarray) -> None:
        """Append ``tokens`` (any integer array, e.g. a memmapped stream: copied COPY_TOKENS at a time)."""
        for lo in range(0, len(tokens), COPY_TOKENS):
            self._file.write(np.ascontiguousarray(tokens[lo : lo + COPY_TOKENS], dtype=self.dtype).data)
        if self.tokens == 0 and len(tokens):
            self._file.flush()  # part of the stream is on disk: a point where the interruption tests kill
            kill_point("bin")
        self.tokens += len(tokens)

    def __enter__(self) -> TokenWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


# ---- reading ------------------------------------------------------------------------------------
def load_prepared(dir: Path) -> PreparedData:
    """Open a prepared folder, checking that meta.json and the files it describes agree."""
    dir = Path(dir)
    if not (dir / META).is_file():
        raise SlmError(f"no prepared data at {dir}: run `slm prepare data=...`")

    def check(meta: dict) -> None:
        data = PreparedData(dir, meta)
        _ = data.dtype, data.vocab_size, data.eos_id, int(meta["train_tokens"]), int(meta["val_tokens"])
        for split in SPLITS:  # a mixture's spans tile each split
            ends = [end for _, _, end in data.spans(split)]
            starts = [start for _, start, _ in data.spans(split)]
            if ends and (starts != [0, *ends[:-1]] or ends[-1] != int(meta[f"{split}_tokens"])):
                raise ValueError(f"the mixture's {split} spans do not tile its {split}_tokens")

    fix = "delete it and re-run `slm prepare`"
    data = PreparedData(dir, read_meta(dir, META_KEYS, fix, check))
    dtype, vocab_size = data.dtype, data.vocab_size
    if dtype != token_dtype(vocab_size):
        raise SlmError(
            f"meta.json at {dir} says dtype {dtype} but vocab_size {vocab_size} needs {token_dtype(vocab_size)}: {fix}"
        )
    for split in SPLITS:
        size = int(data.meta[f"{split}_tokens"]) * dtype.itemsize
        path = dir / f"{split}.bin"
        actual = path.stat().st_size if path.is_file() else 0
        if actual != size:
            raise SlmError(
                f"{path} has {actual} bytes but meta.json expects {size}: delete meta.json and re-run `slm prepare`"
            )
    if not data.tokenizer_path.is_file():
        raise SlmError(f"{data.tokenizer_path} is missing: delete meta.json and re-run `slm prepare`")
    return data


def try_load(dir: Path) -> PreparedData | None:
    """The prepared folder at ``dir``, or None if there is none (or it does not load)."""
    with contextlib.suppress(SlmError):
        return load_prepared(dir)
    return None


def check_same_corpus(meta: dict[str, Any], prepared: PreparedData, subject: str, again: str,
                      tokenizer_fix: str = "") -> None:
    """`subject` (e.g. "reference losses in <folder> were computed") must describe this corpus's
    tokens: the same corpus fingerprint and tokenizer as prepared.meta."""
    if meta["fingerprint"] != prepared.meta["fingerprint"]:
        raise SlmError(f"{subject} for another version of the corpus than {prepared.dir} (fingerprint "
                       f"{meta['fingerprint'][:8]} != {prepared.meta['fingerprint'][:8]}): {again}")
    if meta["tokenizer_sha256"] != prepared.meta["tokenizer_sha256"]:
        raise SlmError(f"{subject} with another tokenizer than {prepared.dir}'s: {again}{tokenizer_fix}")
