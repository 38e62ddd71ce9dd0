"""slm's GPT <-> Hugging Face transformers' GPT-2 (``GPT2LMHeadModel``): the one place that knows how
the two lay out the same network, in both directions.

Parameter names are GPT-2's on both sides (slm_cli/model/gpt.py), so the mapping is a renaming plus
three layout facts: HF's ``Conv1D`` stores the blocks' Linear weights as (in, out); slm pads the
vocabulary to a multiple of 64 and only the tokenizer's real rows are exported; HF GPT-2 always has
biases (a ``bias=False`` model exports zeros, the same function). The MLP's GELU is the tanh
approximation on both sides (``activation_function="gelu_new"``), so the export keeps the logits,
not only the names. transformers and safetensors are the ``hf`` extra, imported only here, on use.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from slm_cli.errors import SlmError
from slm_cli.model.gpt import GPT, GPTConfig

if TYPE_CHECKING:
    import transformers

HF_EXTRA = "pip install 'slm[hf]'"
# GELU variants equal to slm's nn.GELU(approximate="tanh")
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def require_hf(what: str) -> ModuleType:
    """transformers (with safetensors), or one line naming the extra that brings them."""
    try:
        import safetensors  # noqa: F401  (save_pretrained writes model.safetensors with it)
        import transformers
    except ImportError:
        raise SlmError(f"{what} needs transformers and safetensors, which are not installed: {HF_EXTRA}") from None
    transformers.utils.logging.disable_progress_bar()  # one bar per tiny file is noise on a CLI
    return transformers


def _blocks_linear(model: GPT) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"}


# ---- slm -> transformers ------------------------------------------------------------------------
@torch.no_grad()
def hf_state_dict(model: GPT, vocab_size: int | None = None) -> dict[str, Tensor]:
    """``model``'s weights under ``GPT2LMHeadModel``'s names and layouts: the blocks' Linear weights
    transposed (HF's Conv1D is (in, out)), the vocabulary cut to ``vocab_size`` rows (default
    ``config.vocab_size``: the padding rows are dropped), and zero biases for a ``bias=False`` model."""
    vocab = vocab_size or model.config.vocab_size
    conv1d = _blocks_linear(model)
    sd: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm)):
            continue
        weight = module.weight
        if name in ("transformer.wte", "lm_head"):
            weight = weight[:vocab]
        elif name in conv1d:
            weight = weight.T
        sd[f"{name}.weight"] = weight.contiguous().clone()
        if isinstance(module, (nn.Linear, nn.LayerNorm)) and name != "lm_head":
            bias = module.bias
            # weight.shape[-1] is the output width for both Conv1D (in, out) and LayerNorm (d,).
            sd[f"{name}.bias"] = bias.clone() if bias is not None else weight.new_zeros(weight.shape[-1])
    return sd


def hf_config(config: GPTConfig, *, vocab_size: int, eos_token_id: int) -> transformers.GPT2Config:
    """The ``GPT2Config`` of an slm model: GPT-2 with the tokenizer's real vocabulary, its EOS as
    BOS and EOS (GPT-2's convention), tied embeddings and slm's one dropout rate everywhere."""
    transformers = require_hf("export to Hugging Face")
    return transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer,
        n_head=config.n_head, n_inner=None, activation_function="gelu_new", layer_norm_epsilon=1e-5,
        resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id, tie_word_embeddings=True,
        architectures=["GPT2LMHeadModel"],
    )


def to_hf(model: GPT, *, vocab_size: int, eos_token_id: int) -> transformers.GPT2LMHeadModel:
    """A ``GPT2LMHeadModel`` computing the same logits as ``model`` over the first ``vocab_size`` ids."""
    transformers = require_hf("export to Hugging Face")
    if vocab_size > model.config.vocab_size:
        raise SlmError(f"the tokenizer has {vocab_size} tokens but the model only {model.config.vocab_size}: "
                       "export a checkpoint written by `slm train`")
    config = hf_config(model.config, vocab_size=vocab_size, eos_token_id=eos_token_id)
    with torch.device("meta"):  # no random init of weights that are overwritten at once
        hf = transformers.GPT2LMHeadModel(config)
    hf.load_state_dict(hf_state_dict(model, vocab_size), strict=True, assign=True)
    hf.tie_weights()  # assign=True gave lm_head its own copy; tie it back to wte as in GPT-2
    return hf.eval()


# ---- transformers -> slm ------------------------------------------------------------------------
def gpt_config(config: Any, spec: str) -> GPTConfig:
    """The GPTConfig of a Hugging Face GPT-2 config, refused (one line) when slm's GPT would not
    compute the same function."""
    def refuse(why: str) -> SlmError:
        return SlmError(f"{spec} is a Hugging Face model slm cannot load as its GPT ({why}): pass a GPT-2 "
                        "folder, e.g. one written by `slm export`")

    if getattr(config, "model_type", None) != "gpt2":
        raise refuse(f"model_type {getattr(config, 'model_type', None)!r}, not 'gpt2'")
    checks = {
        "activation_function": config.activation_function in TANH_GELU,
        "n_inner": config.n_inner in (None, 4 * config.n_embd),
        "layer_norm_epsilon": abs(config.layer_norm_epsilon - 1e-5) < 1e-12,
        "scale_attn_weights": bool(config.scale_attn_weights),
        "scale_attn_by_inverse_layer_idx": not config.scale_attn_by_inverse_layer_idx,
        "add_cross_attention": not getattr(config, "add_cross_attention", False),
    }
    bad = [f"{k}={getattr(config, k, None)}" for k, ok in checks.items() if not ok]
    if bad:
        raise refuse(", ".join(bad))
    return GPTConfig(block_size=config.n_positions, vocab_size=config.vocab_size, n_layer=config.n_layer,
                     n_head=config.n_head, n_embd=config.n_embd, dropout=float(config.resid_pdrop), bias=True)


@torch.no_grad()
def load_hf_state_dict(model: GPT, hf_sd: dict[str, Tensor], spec: str) -> None:
    """Copy a ``GPT2LMHeadModel`` state dict into ``model`` (the inverse of :func:`hf_state_dict`).

    The padding rows slm adds to the vocabulary are not in an exported model; they get the mean of
    the real rows, whose logit is then the mean of the real logits: a share of the softmax far below
    a typical token's, where zero rows (logit 0) would outweigh every token of a model such as
    GPT-2, whose logits are strongly negative.
    """
    vocab = model.config.vocab_size
    conv1d = _blocks_linear(model)
    wte, lm_head = hf_sd["transformer.wte.weight"], hf_sd.get("lm_head.weight")
    if lm_head is not None and not torch.equal(lm_head, wte):
        raise SlmError(f"{spec} has an output layer untied from its token embedding: slm's GPT ties them "
                       "(tie_word_embeddings=true); pass a GPT-2 with tied embeddings")
    sd: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm)) or name == "lm_head":
            continue
        weight = hf_sd[f"{name}.weight"]
        if name == "transformer.wte":
            padding = weight.mean(0, keepdim=True).expand(model.config.padded_vocab - vocab, -1)
            weight = torch.cat([weight[:vocab], padding])
        elif name in conv1d:
            weight = weight.T
        sd[f"{name}.weight"] = weight
        if isinstance(module, (nn.Linear, nn.LayerNorm)):
            sd[f"{name}.bias"] = hf_sd[f"{name}.bias"]
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise SlmError(f"{spec}: its weights do not fit its config.json ({str(e).splitlines()[0][:160]}): "
                       "pass a folder written by save_pretrained") from None


def is_hf_folder(path: Path) -> bool:
    """A ``save_pretrained`` folder (a config.json), as opposed to an slm run dir or sharded checkpoint."""
    return path.is_dir() and (path / "config.json").is_file()


def tokenizer_file(path: Path, spec: str | Path) -> Path:
    """The fast tokenizer's tokenizer.json in a Hugging Face folder, which slm needs to tokenise alike."""
    tokenizer_json = path / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise SlmError(f"Hugging Face folder {spec} has no tokenizer.json: save its fast tokenizer there "
                       "(AutoTokenizer.from_pretrained(...).save_pretrained(folder))")
    return tokenizer_json


def load_hf(spec: str | Path) -> tuple[GPT, str]:
    """(slm GPT in eval mode, tokenizer.json text) from a Hugging Face GPT-2 folder, e.g. one
    written by `slm export`; it must hold the fast tokenizer's tokenizer.json."""
    transformers = require_hf(f"loading the Hugging Face folder {spec}")
    path = Path(spec).expanduser()
    tokenizer_json = tokenizer_file(path, spec)
    try:
        hf_cfg = transformers.AutoConfig.from_pretrained(path)
    except Exception as e:  # unreadable config.json, unknown model_type
        raise SlmError(f"cannot read {path / 'config.json'} ({str(e).strip().splitlines()[0][:160]}): "
                       "pass a folder written by save_pretrained") from None
    config = gpt_config(hf_cfg, str(spec))
    try:
        hf = transformers.GPT2LMHeadModel.from_pretrained(path)
    except Exception as e:  # missing or truncated weights
        raise SlmError(f"cannot load the weights of {spec} ({str(e).strip().splitlines()[0][:160]}): "
                       "pass a folder written by save_pretrained") from None
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.transformer.wte.weight = model.lm_head.weight  # to_empty keeps the tie, but make it explicit
    load_hf_state_dict(model, hf.state_dict(), str(spec))
    return model.eval(), tokenizer_json.read_text()


def checkpoint_entry(model: GPT, tokenizer_json: str, spec: str) -> dict[str, Any]:
    """What an slm checkpoint's ``slm`` entry says, for a model loaded from a Hugging Face folder:
    its settings and tokenizer, no training history."""
    settings = {f.name: getattr(model.config, f.name) for f in fields(GPTConfig)}
    return {"model": settings, "tokenizer_json": tokenizer_json, "counters": {}, "config": {},
            "source": {"hugging_face": str(spec)}}
