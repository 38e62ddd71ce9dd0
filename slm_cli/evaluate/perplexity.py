"""`slm eval`'s default: perplexity of a model on a split of a corpus, tokenized with the model's own
tokenizer (checkpoints carry it), over non-overlapping windows of the model's context length.

Given an slm run (a run dir or one of its checkpoints), the corpus is the run's own data in its
prepared folder (slm_cli/run_settings.py), unless the command line sets ``data``/``paths.data_dir``;
given a Hugging Face folder, conf/eval.yaml's data.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from slm_cli.data.prepare import prepare
from slm_cli.data.windows import ValWindows
from slm_cli.errors import SlmError
from slm_cli.loss import model_token_stats, perplexity
from slm_cli.model.load import load_gpt
from slm_cli.outputs import write_json
from slm_cli.progress import Progress
from slm_cli.run_settings import describe_data, follow, run_config, whose

# Where the per-token losses lie, not only their mean: a selection that never trains on the tokens
# it finds easy leaves no token easy (docs/methods.md, Ada-ESLM), which the mean alone hides.
QUANTILES = (0.01, 0.05, 0.2, 0.5, 0.8)
EASY_LOSS = math.log(2)  # the label holds more than half the probability


def loss_distribution(losses: np.ndarray) -> dict[str, Any]:
    """``loss_quantiles`` (q → the q-quantile of the per-token losses, linear interpolation) and
    ``easy_frac``, the share of tokens whose loss is below ln 2."""
    values = np.quantile(losses.astype(np.float64), QUANTILES)
    return {"loss_quantiles": {f"{q:g}": float(v) for q, v in zip(QUANTILES, values, strict=True)},
            "easy_frac": float(np.mean(losses < EASY_LOSS))}


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    if cfg.split not in ("train", "val"):
        raise SlmError(f"split={cfg.split} is not a split: use split=val or split=train")
    spec = str(cfg.ckpt_path)
    model, entry = load_gpt(spec)
    cfg, taken = follow(cfg, run_config(spec, entry), ("data", "paths.data_dir"))
    print(f"eval: {whose('data', taken, spec)}data ({describe_data(cfg)}), split {cfg.split}")
    prepared = prepare(cfg.data, cfg.paths, tokenizer_spec=spec)
    if prepared.vocab_size > model.config.vocab_size:
        raise SlmError(f"{prepared.dir} uses a vocabulary of {prepared.vocab_size} but the checkpoint's model "
                       f"has {model.config.vocab_size}: prepare the data with data.tokenizer={spec}")
    limit = None if cfg.max_batches is None else cfg.max_batches * cfg.data.batch_size
    windows = ValWindows(prepared.tokens(cfg.split), model.config.block_size, max_windows=limit)
    loss_sum, count, losses = 0.0, 0, []
    with Progress(math.ceil(len(windows) / cfg.data.batch_size), f"eval {cfg.split}", "batch") as progress:
        for batch in DataLoader(windows, batch_size=cfg.data.batch_size):
            loss = model_token_stats(model, batch["input_ids"], batch["labels"]).loss
            loss_sum += loss.double().sum().item()
            count += loss.numel()
            losses.append(loss.float().cpu().numpy())
            progress.update(1, tokens=loss.numel(), loss=loss_sum / count)
    loss = loss_sum / count
    result = {"checkpoint": spec, "data": str(prepared.dir), "split": cfg.split,
              "tokens": count, "loss": loss, "ppl": perplexity(loss), **loss_distribution(np.concatenate(losses))}
    print(f"eval {cfg.split}: loss {loss:.4f}  ppl {result['ppl']:.2f}  tokens {count}  ({prepared.dir})")
    quantiles = "  ".join(f"p{float(q) * 100:g} {v:.3f}" for q, v in result["loss_quantiles"].items())
    print(f"eval {cfg.split}: per-token loss {quantiles}  below ln 2 {result['easy_frac']:.2%}")
    if cfg.out:
        write_json(cfg.out, result)
    return result
