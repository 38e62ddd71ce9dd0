"""How names and durations are written, everywhere slm writes them: folder slugs and durations."""

from __future__ import annotations

import re


def slug(name: str, fallback: str) -> str:
    """``name`` as a folder name: each run of characters other than letters, digits, '.' and '-'
    becomes one '_' (so "a b", "a_b" and "a**_b" all give "a_b"), and leading or trailing '.', '_'
    and '-' go (no hidden folders); ``fallback`` when nothing is left."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", str(name)).strip("._-") or fallback


def duration(seconds: float) -> str:
    """A duration at the precision a reader needs: 4.2 s, 42 s, 12 min, 3.5 h, 2.5 days."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
