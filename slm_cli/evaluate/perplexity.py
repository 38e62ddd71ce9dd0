"""`slm eval`'s default: perplexity of a checkpoint on a split of a corpus, tokenized with the checkpoint's own
tokenizer (checkpoints carry it), over non-overlapping windows of the model's context length."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from tqdm import tqdm

from slm_cli.data.prepare import prepare
from slm_cli.data.windows import ValWindows
from slm_cli.errors import SlmError
from slm_cli.loss import perplexity, token_stats
from slm_cli.model.load import checkpoint_file, load_model
from slm_cli.outputs import load_checkpoint, write_json


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    if cfg.split not in ("train", "val"):
        raise SlmError(f"split={cfg.split} is not a split: use split=val or split=train")
    ckpt = load_checkpoint(checkpoint_file(cfg.ckpt_path))
    model = load_model(ckpt)
    prepared = prepare(cfg.data, cfg.paths, tokenizer_spec=str(cfg.ckpt_path))
    if prepared.vocab_size > model.config.vocab_size:
        raise SlmError(f"{prepared.dir} uses a vocabulary of {prepared.vocab_size} but the checkpoint's model "
                       f"has {model.config.vocab_size}: prepare the data with data.tokenizer={cfg.ckpt_path}")
    limit = None if cfg.max_batches is None else cfg.max_batches * cfg.data.batch_size
    windows = ValWindows(prepared.tokens(cfg.split), model.config.block_size, max_windows=limit)
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for batch in tqdm(DataLoader(windows, batch_size=cfg.data.batch_size), desc=f"eval {cfg.split}"):
            stats = model(batch["input_ids"], head=lambda h, w, y=batch["labels"]: token_stats(
                h.reshape(-1, h.shape[-1]), w, y.reshape(-1), keep_probs=False))
            loss_sum += stats.loss.double().sum().item()
            count += stats.loss.numel()
    loss = loss_sum / count
    result = {"checkpoint": str(cfg.ckpt_path), "data": str(prepared.dir), "split": cfg.split,
              "tokens": count, "loss": loss, "ppl": perplexity(loss)}
    print(f"eval {cfg.split}: loss {loss:.4f}  ppl {result['ppl']:.2f}  tokens {count}  ({prepared.dir})")
    if cfg.out:
        write_json(cfg.out, result)
    return result
