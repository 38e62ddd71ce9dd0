"""`slm score data=... ckpt_path=<reference>`: reference-model losses beside a corpus (RHO-1)."""

from __future__ import annotations

import math
from typing import Any

import hydra
from omegaconf import DictConfig

from slm_cli.commands import CONFIG_PATH, VERSION_BASE
from slm_cli.errors import SlmError, report_errors


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="score")
@report_errors
def main(cfg: DictConfig) -> str:
    return run(cfg)["folder"]


def run(cfg: DictConfig) -> dict[str, Any]:
    """`slm score`: tokenise the corpus with the reference's tokenizer and score its train split."""
    import torch

    from slm_cli.config import positive_int_or_null
    from slm_cli.data.prepare import prepare
    from slm_cli.reference.models import load
    from slm_cli.reference.scores import check_context, default_name, write_scores
    from slm_cli.text import slug

    batch_size = positive_int_or_null("batch_size", cfg.batch_size, 16)
    if batch_size is None:
        raise SlmError("batch_size=null must be a positive integer: e.g. batch_size=16")
    context = positive_int_or_null("context", cfg.context)
    stride = positive_int_or_null("stride", cfg.stride)
    ref = load(str(cfg.ckpt_path))
    context = context or ref.block_size
    check_context(ref, context)
    stride = stride or context  # the grid training draws its windows from (reference/scores.py)
    if stride > context:
        raise SlmError(f"stride={stride} is larger than context={context}, which would leave tokens unscored: "
                       "set stride<=context or null (= context)")
    device = cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    ref.to(device)
    prepared = prepare(cfg.data, cfg.paths, tokenizer_spec=ref.tokenizer_spec)
    ref.check_data(prepared)
    name = slug(cfg.name, "reference") if cfg.name else default_name(ref.spec)
    folder, stats = write_scores(prepared, name, ref, context=context, stride=stride, batch_size=batch_size)
    n = int(prepared.meta["train_tokens"])
    rate = n / stats["seconds"] if stats["seconds"] > 0 else math.inf
    print(f"scored {folder}: {n:,} tokens, mean reference loss {stats['mean_ref_loss']:.4f}, "
          f"{rate:,.0f} tokens/s (context {context}, stride {stride})")
    return {"folder": str(folder), "tokens": n, "mean_ref_loss": stats["mean_ref_loss"], "tokens_per_s": rate}
