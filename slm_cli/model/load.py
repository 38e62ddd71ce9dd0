"""The one loader of a frozen model, and the checks every loaded model passes.

A model argument (``ckpt_path``, ``init_from``, ``target.teacher``, ``selection.reference.ckpt_path``,
`slm tokens`'s ``reference``) is an slm ``.ckpt`` file, a run dir (its ``checkpoints/last.ckpt``), a
sharded folder written by trainer=fsdp, or a Hugging Face folder (``save_pretrained`` output):
:func:`locate` is the only place that tells them apart. An slm checkpoint carries the model's
config and tokenizer, so nothing else is needed to rebuild it. :func:`load_gpt` returns slm's GPT
(a Hugging Face GPT-2 folder through slm_cli/model/hf.py); reference models and the KD teacher
(slm_cli/reference/models.py) load Hugging Face folders as any causal LM. :func:`check_tokenizer`
is the one tokenizer identity test (the sha256 that `slm prepare` stores), and
:func:`init_weights` copies a model's weights into a new run (`slm train init_from=...`). Every
error names the setting the user gave.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from slm_cli.data.tokenizer import tokenizer_sha256
from slm_cli.errors import SlmError
from slm_cli.model.gpt import GPT, GPTConfig
from slm_cli.model.hf import checkpoint_entry, is_hf_folder, load_hf  # transformers: imported on use
from slm_cli.outputs import RUN_DIR_CHECKPOINT, is_sharded_checkpoint, load_checkpoint

if TYPE_CHECKING:
    from slm_cli.data.prepared import PreparedData

# The settings that decide the weights' shapes: init_from needs them equal (dropout may differ;
# biases are compared through the weights, see init_weights).
SHAPE_SETTINGS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")


def locate(spec: str | Path, key: str = "ckpt_path") -> tuple[Path, bool]:
    """(path, is_hugging_face) for a model argument: an slm checkpoint file or sharded folder (a run
    dir means its ``checkpoints/last.ckpt``), or a Hugging Face folder. A path that does not exist is
    returned as it is: :func:`slm_cli.outputs.load_checkpoint` says so, naming ``key``."""
    path = Path(spec).expanduser()
    if not path.is_dir() or is_sharded_checkpoint(path):
        return path, False
    if (path / RUN_DIR_CHECKPOINT).exists():
        return path / RUN_DIR_CHECKPOINT, False
    if is_hf_folder(path):
        return path, True
    raise SlmError(f"{key}={spec} is a folder but not an slm run dir (no {RUN_DIR_CHECKPOINT}), a sharded checkpoint "
                   f"nor a Hugging Face model folder (no config.json): pass {key}=<run>/checkpoints/last.ckpt, the "
                   "run dir or a save_pretrained folder")


def checkpoint_file(spec: str | Path, key: str = "ckpt_path") -> Path:
    """The slm checkpoint (file or sharded folder) that ``spec`` names, for the commands that need
    slm's own checkpoint (`slm export`, `slm eval tasks=...`)."""
    path, hugging_face = locate(spec, key)
    if hugging_face:
        raise SlmError(f"{key}={spec} is a Hugging Face folder, not an slm checkpoint: pass {key}=<run>/checkpoints/"
                       "last.ckpt or the run dir")
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


def load_slm(path: Path, key: str = "ckpt_path") -> tuple[GPT, dict[str, Any]]:
    """(model, the checkpoint's ``slm`` entry) of a located slm checkpoint."""
    ckpt = load_checkpoint(path, key=key)
    return load_model(ckpt), ckpt["slm"]


def load_gpt(spec: str | Path, key: str = "ckpt_path") -> tuple[GPT, dict[str, Any]]:
    """(model, the checkpoint's ``slm`` entry: config, tokenizer, counters...) for ``spec``: an slm
    checkpoint, run dir or sharded folder, or a Hugging Face GPT-2 folder (whose entry has its
    settings and tokenizer, and empty counters and config)."""
    path, hugging_face = locate(spec, key)
    if not hugging_face:
        return load_slm(path, key)
    model, tokenizer_json = load_hf(path)
    return model, checkpoint_entry(model, tokenizer_json, str(spec))


# ---- the checks a frozen model passes -------------------------------------------------------------
@dataclass(frozen=True)
class TokenizerId:
    """A tokenizer's identity (the sha256 of its canonical JSON, what `slm prepare` stores as
    ``tokenizer_sha256``), its vocabulary, and what holds it, for messages."""

    sha256: str
    vocab_size: int
    holder: str

    @classmethod
    def of_json(cls, tokenizer_json: str, holder: str) -> TokenizerId:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(tokenizer_json)
        return cls(tokenizer_sha256(tokenizer), tokenizer.get_vocab_size(), holder)

    @classmethod
    def of_data(cls, prepared: PreparedData) -> TokenizerId:
        return cls(prepared.meta["tokenizer_sha256"], prepared.vocab_size, f"the data in {prepared.dir}")


def check_tokenizer(model: TokenizerId, data: TokenizerId, *, key: str, spec: str, fix: str | None = None) -> None:
    """The model given as ``key=spec`` reads token ids as ``data``'s tokenizer writes them, or one
    line naming both tokenizers; by default the fix is to prepare the data with the model's."""
    if model.sha256 != data.sha256:
        raise SlmError(f"{key}={spec} was trained with another tokenizer than {data.holder} (vocabulary "
                       f"{model.vocab_size} with tokenizer {model.sha256[:8]}, while {data.holder} has "
                       f"{data.vocab_size} with {data.sha256[:8]}): "
                       f"{fix or f'prepare the data with data.tokenizer={spec}'}")


def check_context(tokens: int, block_size: int, *, key: str, spec: str, what: str | None = None,
                  fix: str | None = None) -> None:
    """Windows of ``tokens`` fit the context (``block_size``) of the model given as ``key=spec``."""
    if tokens > block_size:
        what = what or f"training windows of {tokens} tokens"
        fix = fix or f"lower model.block_size to {block_size} or pass a {key} with a longer context"
        raise SlmError(f"{what} exceed the context of {key}={spec} ({block_size} tokens): {fix}")


@torch.no_grad()
def init_weights(model: GPT, spec: str, tokenizer_json: str) -> str:
    """Copy the weights of ``spec`` (what :func:`load_gpt` takes) into ``model``: the same shapes
    and the same tokenizer, or one line naming the difference. Returns a line for the log."""
    with torch.random.fork_rng(devices=[]):  # loading must not move the run's seeded RNG stream
        source, entry = load_gpt(spec, key="init_from")
    # The tokenizer first: another tokenizer usually means another vocabulary size as well.
    check_tokenizer(TokenizerId.of_json(entry["tokenizer_json"], f"init_from={spec}"),
                    TokenizerId.of_json(tokenizer_json, "this run's data"), key="init_from", spec=spec)
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
