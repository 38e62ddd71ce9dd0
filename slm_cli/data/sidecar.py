"""Folders of files committed as one: a prepared corpus (slm_cli/data/prepared.py), and the per-token
folders written beside its train.bin (reference losses for RHO-1, n-gram top-r arrays for CoCoNTs).

Every such folder follows one protocol, implemented here once:

- *write*: :func:`staged` takes the folder's lock, removes its ``meta.json`` (from then on the folder
  is "not there") and what a killed writer left (``.staged-*`` folders, half-written ``meta.json``
  temporaries), lets the caller write every file into a new temporary folder inside it, moves the
  files into place and writes ``meta.json`` last, atomically (:func:`commit`). A folder with a
  ``meta.json`` is therefore always complete, and a writer interrupted at any moment, even by
  SIGKILL, leaves a folder that readers refuse and the next writer cleans up.
- *lock*: :func:`exclusive` is an advisory ``flock`` on ``.<folder>.lock`` beside the folder; the
  kernel releases it when the process dies, so a lock file left by a killed run blocks nothing.
- *read*: :func:`read_meta` parses ``meta.json`` and checks its keys, so a damaged file is one line
  naming the folder and the fix; :func:`load_array` checks a per-token array's shape and dtype.

``SLM_KILL_AT=<point>`` makes the process SIGKILL itself at that point of the protocol (``staged``:
the old meta.json is gone, nothing written yet; ``moved``: the first file is in place; ``commit``:
every file is in place, meta.json not yet written) or of a writer that calls :func:`kill_point`
(prepare's ``bin``: part of a token stream is on disk); tests/test_interrupted.py uses it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slm_cli.errors import SlmError

META = "meta.json"
STAGED_PREFIX = ".staged-"
KILL_ENV = "SLM_KILL_AT"
# Locks this process holds, with their depth: a build that holds its folder's lock (prepare) can
# enter `staged` on the same folder. flock itself is per open file, so it would wait on itself.
_HELD: dict[Path, int] = {}


def kill_point(point: str) -> None:
    """SIGKILL this process here if ``SLM_KILL_AT`` names ``point`` (the interruption tests)."""
    if os.environ.get(KILL_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def lock_path(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.lock")


@contextlib.contextmanager
def exclusive(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s lock while the block runs (re-entrant within a process). Every process of a
    multi-device run prepares at once (torchrun and srun start them together): the first one to
    take the lock builds, the others wait and then find the folder ready."""
    import fcntl

    path = lock_path(folder).resolve()
    if _HELD.get(path):
        _HELD[path] += 1
        try:
            yield
        finally:
            _HELD[path] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        _HELD[path] = 1
        try:
            yield
        finally:
            del _HELD[path]
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class Stage:
    """A folder being written: ``dir`` holds the new files; ``meta`` is set by the caller before
    the block ends and becomes meta.json once every file is in place."""

    dir: Path
    meta: dict[str, Any] | None = field(default=None)


def _clear_leftovers(folder: Path) -> None:
    """What a killed writer left in ``folder``: its staging folders and meta.json temporaries. Only
    called under the folder's lock, so no live writer owns them."""
    for path in folder.glob(f"{STAGED_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)
    for path in folder.glob(f".{META}.*.tmp"):
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def staged(folder: Path, files: Iterable[str]) -> Iterator[Stage]:
    """Yield a :class:`Stage` inside ``folder`` for the caller to write ``files`` into and to set
    ``meta`` on; on success move the files into ``folder`` and commit ``meta``. ``folder``'s old
    meta.json is removed first: an old meta.json must never bless new files."""
    with exclusive(folder):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / META).unlink(missing_ok=True)
        _clear_leftovers(folder)
        with tempfile.TemporaryDirectory(dir=folder, prefix=STAGED_PREFIX) as tmp:
            kill_point("staged")
            stage = Stage(Path(tmp))
            yield stage
            if stage.meta is None:
                raise RuntimeError(f"nothing set the meta.json of {folder}")
            for i, name in enumerate(files):
                os.replace(stage.dir / name, folder / name)
                if i == 0:
                    kill_point("moved")
        commit(folder, stage.meta)


def commit(folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``folder``'s meta.json atomically: the commit of its files. Call it through
    :func:`staged`, or under :func:`exclusive` to change a committed folder's description."""
    from slm_cli.outputs import write_json  # deferred: it imports torch, which a data build never needs

    kill_point("commit")
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
