"""Vectorised n-gram counting and the top-r per-token arrays of the n-gram targets (docs/ngram.md)."""
