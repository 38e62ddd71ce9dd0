"""Run outputs: atomic file writes, summary.json, and the checkpoint reader/writer.

Everything a run leaves behind is written to a temporary file in the same folder and renamed into
place, so an interrupted run never leaves a truncated file that looks valid.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from slm_cli.errors import SlmError

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call `write(fileobj)` on a temporary file next to `path`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    data = (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()
    return atomic_write(path, lambda f: f.write(data))


# Where an slm run dir keeps its last checkpoint (written by the training loop).
RUN_DIR_CHECKPOINT = Path("checkpoints") / "last.ckpt"
SHARDED_META = "meta.pt"  # Lightning's file for the non-tensor part of a sharded checkpoint folder


def is_sharded_checkpoint(path: Path) -> bool:
    """A folder written by trainer=fsdp (slm_cli.distributed.FSDPStrategy)."""
    return path.is_dir() and (path / SHARDED_META).is_file()


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", *, tensors: bool = True,
                    key: str = "ckpt_path") -> dict[str, Any]:
    """Load an slm checkpoint with ``weights_only=True`` (tensors and plain containers only).

    ``tensors=False`` asks only for the non-tensor part (the ``slm`` entry, the step): a sharded
    checkpoint then reads its meta.pt alone instead of consolidating every shard. ``key`` is the
    setting that named the checkpoint (``init_from``, ``target.teacher``...): the errors name it.
    """
    path = Path(path)
    if not path.exists():
        raise SlmError(f"{key}={path} does not exist: pass {key}=<an existing checkpoint, e.g. "
                       "<run>/checkpoints/last.ckpt>")
    try:
        if path.is_dir() and not tensors:
            ckpt = {"state_dict": {}, **torch.load(path / SHARDED_META, map_location=map_location, weights_only=True)}
        elif path.is_dir():  # a sharded checkpoint (trainer=fsdp): consolidated in memory
            ckpt = _load_sharded(path)
        else:
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or holds arbitrary objects
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise SlmError(f"{key}: checkpoint {path} is corrupt or not an slm checkpoint ({reason}): "
                       f"pass another {key}, e.g. a run's checkpoints/last.ckpt") from exc
    if not isinstance(ckpt, dict) or "slm" not in ckpt or "state_dict" not in ckpt:
        raise SlmError(f"{key}: checkpoint {path} was not written by `slm train`: pass another {key}, a "
                       "checkpoint from an slm run dir")
    return ckpt


def _load_sharded(path: Path) -> dict[str, Any]:
    """The full checkpoint from a folder of shards written by trainer=fsdp, in one process.

    Lightning's own loader for the format (what `python -m lightning.pytorch.utilities.
    consolidate_checkpoint` runs); its non-tensor part (meta.pt) is read with weights_only.
    """
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    if not is_sharded_checkpoint(path):
        raise ValueError(f"no {SHARDED_META} in the folder")
    return _load_distributed_checkpoint(path)


def read_metrics(csv_path: Path, before_step: int) -> tuple[list[str], list[dict[str, str]]]:
    """The header of a metrics.csv and its rows logged before ``before_step``."""
    import csv

    if not csv_path.is_file():
        return [], []
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        rows = [row for row in reader if row.get("step") and float(row["step"]) < before_step]
        return list(reader.fieldnames or []), rows


def write_metrics(csv_path: Path, header: list[str], rows: list[dict[str, str]]) -> None:
    import csv

    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=header)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(csv_path, lambda f: f.write(text.getvalue().encode()))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO with atomic saves and weights-only loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any = None) -> None:
        atomic_write(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path: _PATH, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path, map_location=map_location or "cpu")
