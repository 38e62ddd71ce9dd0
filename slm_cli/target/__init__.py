"""Training targets: the one-hot next token, or n-gram soft targets (arXiv 2407.02819)."""

from slm_cli.target.base import Target

__all__ = ["Target"]
