"""The on-disk format of a prepared corpus, which every reader needs: flat ``train.bin`` /
``val.bin`` token streams (nanoGPT's layout), the ``tokenizer.json`` that made them, and the
``meta.json`` that describes them and commits the folder (slm_cli/data/sidecar.py).
The build lives in slm_cli/data/prepare.py; only `slm prepare` (and the commands that prepare on
demand) run it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slm_cli.data.sidecar import META, read_meta
from slm_cli.errors import SlmError

FORMAT_VERSION = 1
SPLITS = ("train", "val")
META_KEYS = (
    "format_version", "name", "source", "fingerprint", "source_fingerprint", "tokenizer_sha256", "tokenizer",
    "vocab_size", "eos_id", "dtype", "train_tokens", "val_tokens", "documents", "settings", "created",
)  # fmt: skip


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
        return [s["name"] for s in self.meta.get("mixture") or []]

    @property
    def source_weights(self) -> list[float]:
        return [float(s["weight"]) for s in self.meta.get("mixture") or []]

    def spans(self, split: str) -> list[tuple[str, int, int]]:
        """A mixture's (name, start, end) token span per source in ``split``; [] for one corpus."""
        return [(s["name"], int(s[split][0]), int(s[split][1])) for s in self.meta.get("mixture") or []]

    def tokens(self, split: str) -> np.memmap:
        """Read-only memmap of a split's token stream (opened lazily; cheap to call per worker)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        return np.memmap(
            self.dir / f"{split}.bin", dtype=self.dtype, mode="r", shape=(self.meta[f"{split}_tokens"],)
        )


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
