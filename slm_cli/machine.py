"""What the code runs on, described in one place: the benchmarks' records and the results page
(docs/results.md) name the CPU, its cores, the GPUs found and the versions the same way."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Any


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what the platform module says."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def gpus() -> str | None:
    """The CUDA devices torch sees, e.g. "8 × NVIDIA H100 80GB HBM3"; None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return ", ".join(f"{names.count(name)} × {name}" for name in dict.fromkeys(names))


def machine() -> dict[str, Any]:
    """This machine and the software versions, as a record."""
    import lightning
    import torch

    return {"cpu": cpu_name(), "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpus(),
            "torch": torch.__version__, "lightning": lightning.__version__, "python": platform.python_version()}


def describe(record: dict[str, Any]) -> str:
    """One line: "<CPU>, 2 cores, no GPU; Python 3.11.7, torch 2.13.0+cpu"."""
    return (f"{record['cpu']}, {record['nproc']} cores, {record['gpu'] or 'no GPU'}; Python {record['python']}, "
            f"torch {record['torch']}")
