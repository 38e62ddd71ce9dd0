"""`slm sample`: continuations of a prompt from a checkpoint (or a Hugging Face GPT-2 folder).

The prompt is encoded with the model's own tokenizer; an empty prompt starts a new document (the
EOS token), as GPT-2 samples unconditionally. A prompt longer than the context is cropped from the
left: the model sees its last ``block_size`` tokens. The same seed gives the same text.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig

from slm_cli.config import is_int, is_number
from slm_cli.data.tokenizer import eos_id
from slm_cli.errors import SlmError
from slm_cli.model.generate import generate
from slm_cli.model.load import load_gpt
from slm_cli.run_settings import run_config

log = logging.getLogger(__name__)


def check(max_new_tokens: Any, temperature: Any, top_k: Any, seed: Any, num_samples: Any) -> None:
    """One line per bad value, before the model is loaded."""
    rules = [
        (is_int(max_new_tokens) and max_new_tokens > 0, "max_new_tokens", max_new_tokens, "a positive integer", "100"),
        (is_number(temperature) and temperature >= 0, "temperature", temperature, "a number >= 0 (0: greedy)", "0.8"),
        (top_k is None or (is_int(top_k) and top_k > 0), "top_k", top_k, "a positive integer or null", "50"),
        (is_int(seed), "seed", seed, "an integer", "1337"),
        (is_int(num_samples) and num_samples > 0, "num_samples", num_samples, "a positive integer", "3"),
    ]
    for ok, key, value, rule, example in rules:
        if not ok:
            raise SlmError(f"{key}={value} must be {rule}: e.g. {key}={example}")


def sample(spec: str, prompt: str = "", *, max_new_tokens: int = 100, temperature: float = 1.0,
           top_k: int | None = None, seed: int = 1337, num_samples: int = 1, stop_at_eos: bool = True,
           device: str | None = None) -> list[str]:
    """``num_samples`` continuations of ``prompt`` (the new text only, without the final EOS)."""
    check(max_new_tokens, temperature, top_k, seed, num_samples)
    from tokenizers import Tokenizer

    model, entry = load_gpt(spec)
    tokenizer = Tokenizer.from_str(entry["tokenizer_json"])
    try:
        eos = eos_id(tokenizer, (run_config(spec, entry).get("data") or {}).get("eos_token"))
    except SlmError:  # a tokenizer without an end-of-text token: nothing to stop at or start from
        eos = None
    ids = tokenizer.encode(prompt).ids if prompt else ([eos] if eos is not None else [])
    if not ids:
        raise SlmError(f"ckpt_path={spec}: its tokenizer has no end-of-text token to start from: pass a prompt")
    block = model.config.block_size
    if len(ids) > block:
        log.warning(f"the prompt is {len(ids)} tokens, longer than the context ({block}): the model sees its last "
                    f"{block} tokens")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    generator = torch.Generator(device=device).manual_seed(int(seed))
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    new = generate(model, idx, max_new_tokens, temperature=float(temperature), top_k=top_k,
                   eos_id=eos if stop_at_eos else None, generator=generator)
    texts = []
    for row in new.tolist():
        if stop_at_eos and eos in row:
            row = row[: row.index(eos)]
        texts.append(tokenizer.decode(row, skip_special_tokens=False))
    return texts


def print_samples(cfg: DictConfig) -> list[str]:
    """`slm sample`: the continuations of conf/sample.yaml's settings, printed after the prompt."""
    texts = sample(str(cfg.ckpt_path), str(cfg.prompt), max_new_tokens=cfg.max_new_tokens,
                   temperature=cfg.temperature, top_k=cfg.top_k, seed=cfg.seed, num_samples=cfg.num_samples,
                   stop_at_eos=cfg.stop_at_eos, device=cfg.device)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i + 1} ---")
        print(f"{cfg.prompt}{text}")
    return texts
