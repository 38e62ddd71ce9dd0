"""A report's output folder, written as one: every file goes into a staging folder beside it,
which is renamed into place at the end. An interrupted report leaves only a hidden ``.NAME.staging-*``
folder; an earlier report in the same place stays whole until the new one replaces it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from slm_cli.errors import SlmError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def staged_folder(out: Path, marker: str) -> Iterator[Path]:
    """Yield an empty staging folder; on success it becomes ``out``.

    ``marker`` is a file every report of this kind writes (e.g. "report.md"): an existing ``out``
    is replaced only if it holds one, or is empty, so a mistyped ``out=`` never deletes other files.
    """
    out = Path(out).absolute()
    if out.exists() and not (out.is_dir() and ((out / marker).is_file() or not any(out.iterdir()))):
        raise SlmError(f"out={out} exists and is not an earlier report (no {marker} in it): "
                       "pass a new folder or an earlier report's folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        yield stage
        os.chmod(stage, 0o777 & ~_UMASK)  # mkdtemp makes it private; give it the usual permissions
        old = None
        if out.exists():  # a directory cannot be renamed over a non-empty one: move it aside first
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        try:
            os.replace(stage, out)
        except BaseException:
            if old is not None:
                os.replace(old / out.name, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
