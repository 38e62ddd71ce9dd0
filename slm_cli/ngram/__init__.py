"""Vectorised n-gram counting and the top-r per-token arrays of the n-gram targets (docs/ngram.md)."""

from slm_cli.ngram.build import NGRAM_FILES, build_ngram, load_ngram, ngram, ngram_dir, write_ngram

__all__ = ["NGRAM_FILES", "build_ngram", "load_ngram", "ngram", "ngram_dir", "write_ngram"]
