"""Token-selection strategies behind one interface (see base.py)."""

from slm_cli.selection.base import Selected, Selection

__all__ = ["Selected", "Selection"]
