"""`slm ngram data=... ngram.n=4 ngram.r=8`: top-r n-gram distributions beside a corpus."""

from __future__ import annotations

import math
from typing import Any

import hydra
from omegaconf import DictConfig

from slm_cli.commands import CONFIG_PATH, VERSION_BASE
from slm_cli.errors import report_errors


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="ngram")
@report_errors
def main(cfg: DictConfig) -> str:
    return run(cfg)["folder"]


def run(cfg: DictConfig) -> dict[str, Any]:
    """`slm ngram`: prepare the corpus and build its top-r n-gram arrays."""
    from slm_cli.data.prepare import prepare
    from slm_cli.ngram.build import check_settings, write_ngram

    c = cfg.ngram
    check_settings(c.n, c.r, chunk_tokens=c.chunk_tokens, shards=c.shards, dtype=c.dtype)
    prepared = prepare(cfg.data, cfg.paths)
    folder, meta = write_ngram(prepared, int(c.n), int(c.r), chunk_tokens=int(c.chunk_tokens),
                               shards=int(c.shards), dtype=str(c.dtype), force=bool(c.force))
    if meta.get("skipped"):
        print(f"n-gram arrays {folder} are up to date ({meta['train_tokens']:,} tokens, n={meta['n']}, "
              f"r={meta['r']}): nothing to do (ngram.force=true rebuilds)")
    else:
        rate = meta["train_tokens"] / meta["seconds"] if meta["seconds"] > 0 else math.inf
        print(f"built {folder}: {meta['train_tokens']:,} tokens, {meta['contexts']:,} contexts, "
              f"{meta['ngrams']:,} distinct {meta['n']}-grams, top {meta['r']} ({meta['dtype']}), "
              f"{rate:,.0f} tokens/s")
    return {"folder": str(folder), **meta}
