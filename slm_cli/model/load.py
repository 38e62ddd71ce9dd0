"""Any slm checkpoint -> GPT: a ``.ckpt`` file, a run dir (its ``checkpoints/last.ckpt``) or a
sharded folder written by trainer=fsdp. The checkpoint carries the model's config and tokenizer,
so nothing else is needed to rebuild it (what `slm eval`, `slm score` and references use).
:func:`load_gpt` also takes a Hugging Face GPT-2 folder (slm_cli/model/hf.py), and
:func:`init_weights` copies any of these into a model (`slm train init_from=...`).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from slm_cli.errors import SlmError
from slm_cli.model.gpt import GPT, GPTConfig
from slm_cli.outputs import RUN_DIR_CHECKPOINT, is_sharded_checkpoint, load_checkpoint

# The settings that decide the weights' shapes: init_from needs them equal (dropout may differ;
# biases are compared through the weights, see init_weights).
SHAPE_SETTINGS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")


def checkpoint_file(spec: str | Path) -> Path:
    """The checkpoint a user means by ``spec``: the file or sharded folder itself, or a run dir's
    ``checkpoints/last.ckpt``."""
    path = Path(spec).expanduser()
    if path.is_dir() and not is_sharded_checkpoint(path):
        if (path / RUN_DIR_CHECKPOINT).exists():
            return path / RUN_DIR_CHECKPOINT
        raise SlmError(f"{spec} is a folder but not an slm run dir (no {RUN_DIR_CHECKPOINT}) nor a sharded "
                       "checkpoint: pass <run>/checkpoints/last.ckpt or the run dir")
    return path


def load_model(ckpt: dict[str, Any]) -> GPT:
    """The GPT stored in a loaded slm checkpoint (its config travels with it), in eval mode."""
    settings = ckpt["slm"].get("model")
    known = {f.name for f in fields(GPTConfig)}
    if not isinstance(settings, dict) or not set(settings) <= known:
        unknown = sorted(set(settings) - known) if isinstance(settings, dict) else settings
        raise SlmError(f"the checkpoint holds a model this slm does not know (model settings {unknown}): "
                       "use the slm version that wrote it")
    model = GPT(GPTConfig(**settings))
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # missing, extra or misshapen tensors
        raise SlmError(f"the checkpoint's weights do not fit its model settings {settings} "
                       f"({str(e).splitlines()[0][:120]}): use the slm version that wrote it") from None
    return model.eval()


def load_gpt(spec: str | Path) -> tuple[GPT, dict[str, Any]]:
    """(model, the checkpoint's ``slm`` entry: config, tokenizer, counters...) for ``spec``: an slm
    checkpoint, run dir or sharded folder, or a Hugging Face GPT-2 folder (whose entry has its
    settings and tokenizer, and empty counters and config)."""
    path = Path(spec).expanduser()
    if path.is_dir() and not is_sharded_checkpoint(path) and not (path / RUN_DIR_CHECKPOINT).exists():
        from slm_cli.model import hf  # deferred: transformers is an extra

        if hf.is_hf_folder(path):
            model, tokenizer_json = hf.load_hf(path)
            return model, hf.checkpoint_entry(model, tokenizer_json, str(spec))
    ckpt = load_checkpoint(checkpoint_file(spec))
    return load_model(ckpt), ckpt["slm"]


def same_tokenizer(a_json: str, b_json: str) -> bool:
    """Two tokenizer.json texts describe the same tokenizer (the identity `slm prepare` hashes)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(a_json).to_str() == Tokenizer.from_str(b_json).to_str()


@torch.no_grad()
def init_weights(model: GPT, spec: str, tokenizer_json: str) -> str:
    """Copy the weights of ``spec`` (what :func:`load_gpt` takes) into ``model``: the same shapes
    and the same tokenizer, or one line naming the difference. Returns a line for the log."""
    with torch.random.fork_rng(devices=[]):  # loading must not move the run's seeded RNG stream
        source, entry = load_gpt(spec)
    # The tokenizer first: another tokenizer usually means another vocabulary size as well.
    if not same_tokenizer(entry["tokenizer_json"], tokenizer_json):
        raise SlmError(f"init_from={spec} was trained with another tokenizer than this run's data: prepare the "
                       f"data with data.tokenizer={spec}")
    have, want = source.config, model.config
    diff = [f"model.{k}={getattr(want, k)} ({spec}: {getattr(have, k)})" for k in SHAPE_SETTINGS
            if getattr(have, k) != getattr(want, k)]
    if diff:
        raise SlmError(f"init_from={spec} does not match this model: {', '.join(diff)}: pass its model settings "
                       "(e.g. model=<its size>), or drop init_from")
    weights = source.state_dict()
    state = {}
    for name, tensor in model.state_dict().items():
        # A bias=False source has none: its biases are zero, which a bias=True model can hold.
        state[name] = weights.get(name, torch.zeros_like(tensor) if name.endswith(".bias") else None)
    dropped = [k for k in weights.keys() - state.keys() if weights[k].any()]
    if dropped:
        raise SlmError(f"init_from={spec} has nonzero biases but this model has model.bias=false: "
                       "set model.bias=true")
    model.load_state_dict(state)
    return f"init_from: weights of {spec} ({source.num_params() / 1e6:.2f}M params); fresh optimizer, step 0"
