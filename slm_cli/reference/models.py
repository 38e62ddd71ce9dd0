"""Reference models for RHO-1 (arXiv 2404.07965): frozen causal LMs that score tokens.

A reference shares the training data's tokenizer and is either an slm checkpoint (``*.ckpt``, a
run dir whose ``checkpoints/last.ckpt`` is used, or a sharded folder) or a Hugging Face causal-LM
folder (``save_pretrained`` output holding a ``tokenizer.json``; needs ``pip install 'slm[hf]'``).
It runs online during training (selection.reference.mode=online) or once over the corpus through
`slm score` (slm_cli/reference/scores.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from slm_cli.data.tokenizer import load_tokenizer, tokenizer_sha256
from slm_cli.errors import SlmError
from slm_cli.flops import flops_per_token, hf_forward_flops_per_token, hf_matmul_params
from slm_cli.loss import logits_stats, token_stats
from slm_cli.model.load import load_model
from slm_cli.outputs import RUN_DIR_CHECKPOINT, is_sharded_checkpoint, load_checkpoint

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from slm_cli.data.prepared import PreparedData
    from slm_cli.model.gpt import GPT


class ReferenceModel:
    """A frozen causal LM that scores tokens: per-token loss and predictive entropy, no gradient."""

    kind = "base"

    def __init__(self, spec: str, model: torch.nn.Module, tokenizer: Tokenizer, *, tokenizer_spec: str,
                 block_size: int, forward_flops_per_token: float, describe: str) -> None:
        self.spec = spec  # what the user passed (ckpt_path / selection.reference.ckpt_path)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.tokenizer_sha256 = tokenizer_sha256(tokenizer)
        self.tokenizer_spec = tokenizer_spec  # what `prepare` / data.tokenizer loads the same tokenizer from
        self.vocab_size = tokenizer.get_vocab_size()  # the real vocabulary (no model padding)
        self.block_size = block_size
        self.forward_flops_per_token = float(forward_flops_per_token)
        self.describe = describe

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> ReferenceModel:
        self.model.to(device)
        return self

    def token_stats(self, input_ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(loss, entropy), each (B, T) float32 on the model's device, for (B, T) ids and labels."""
        raise NotImplementedError

    def check_data(self, prepared: PreparedData) -> None:
        """The data must be tokenised with the reference's own tokenizer, or its scores mean nothing."""
        if prepared.meta["tokenizer_sha256"] != self.tokenizer_sha256:
            raise SlmError(
                f"reference {self.spec} has vocabulary {self.vocab_size} (tokenizer {self.tokenizer_sha256[:8]}) "
                f"but the data's tokenizer in {prepared.dir} has {prepared.vocab_size} "
                f"({prepared.meta['tokenizer_sha256'][:8]}): prepare the data with data.tokenizer={self.spec}"
            )


class SlmReference(ReferenceModel):
    """An slm GPT. Its loss is the one `slm train`/`slm eval` report: softmax over the padded head."""

    kind = "slm"

    def __init__(self, spec: str, model: GPT, tokenizer: Tokenizer, *, tokenizer_spec: str | None = None) -> None:
        cfg = model.config
        if tokenizer.get_vocab_size() > cfg.vocab_size:
            raise SlmError(f"reference {spec}: its tokenizer has {tokenizer.get_vocab_size()} tokens but its model "
                           f"only {cfg.vocab_size}: pass a checkpoint written by `slm train`")
        super().__init__(
            spec, model, tokenizer, tokenizer_spec=tokenizer_spec or spec, block_size=cfg.block_size,
            # Forward only: one third of the 6N + 12·L·T·d training convention of slm_cli/flops.py.
            forward_flops_per_token=flops_per_token(cfg) / 3,
            describe=(f"slm GPT {spec} ({cfg.n_layer} layers, n_embd {cfg.n_embd}, "
                      f"{model.num_params() / 1e6:.2f}M params, context {cfg.block_size})"),
        )

    @torch.no_grad()
    def token_stats(self, input_ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        ids, y = input_ids.to(self.device), labels.to(self.device)

        def head(hidden: Tensor, weight: Tensor):
            return token_stats(hidden.reshape(-1, hidden.shape[-1]), weight, y.reshape(-1), keep_probs=False,
                               entropy=True)

        stats = self.model(ids, head=head)
        return stats.loss.view(y.shape), stats.entropy.view(y.shape)


class HFReference(ReferenceModel):
    """A Hugging Face causal LM. Logits are cut to the tokenizer's vocabulary before the softmax:
    models often pad their embedding matrix (e.g. to a multiple of 64) with rows no token uses."""

    kind = "hf"

    def __init__(self, spec: str, model: torch.nn.Module, tokenizer: Tokenizer, *, tokenizer_spec: str) -> None:
        config = model.config
        model_vocab = model.get_output_embeddings().weight.shape[0]
        if tokenizer.get_vocab_size() > model_vocab:
            raise SlmError(f"reference {spec}: its tokenizer.json has {tokenizer.get_vocab_size()} tokens but the "
                           f"model's output layer only {model_vocab}: save the tokenizer the model was trained with")
        block_size = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        if not block_size:
            raise SlmError(f"reference {spec}: its config.json names no context length (max_position_embeddings): "
                           "pass context=<tokens> to `slm score`")
        layers, d = config.num_hidden_layers, config.hidden_size
        super().__init__(
            spec, model, tokenizer, tokenizer_spec=tokenizer_spec, block_size=int(block_size),
            forward_flops_per_token=hf_forward_flops_per_token(model, int(block_size)),
            describe=(f"Hugging Face {config.model_type} {spec} ({layers} layers, hidden {d}, "
                      f"{hf_matmul_params(model) / 1e6:.2f}M matmul params, context {block_size})"),
        )

    @torch.no_grad()
    def token_stats(self, input_ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        ids, y = input_ids.to(self.device), labels.to(self.device)
        logits = self.model(input_ids=ids, use_cache=False).logits[..., : self.vocab_size]
        stats = logits_stats(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        return stats.loss.view(y.shape), stats.entropy.view(y.shape)


def load(spec: str) -> ReferenceModel:
    """An slm checkpoint (``*.ckpt`` or run dir) or a Hugging Face causal-LM folder, on the CPU."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        if is_sharded_checkpoint(path):
            return _load_slm(spec, path)
        if (path / RUN_DIR_CHECKPOINT).exists():
            return _load_slm(spec, path / RUN_DIR_CHECKPOINT)
        if (path / "config.json").is_file():
            return _load_hf(spec, path)
        raise SlmError(f"reference {spec} is neither an slm run dir (no {RUN_DIR_CHECKPOINT}) nor a Hugging Face "
                       "model folder (no config.json): pass <run>/checkpoints/last.ckpt or a save_pretrained folder")
    if path.is_file():
        return _load_slm(spec, path)
    raise SlmError(f"reference {spec} does not exist: pass an slm checkpoint (<run>/checkpoints/last.ckpt), "
                   "a run dir or a Hugging Face model folder")


def _load_slm(spec: str, path: Path) -> SlmReference:
    from tokenizers import Tokenizer

    ckpt = load_checkpoint(path)
    model = load_model(ckpt)
    return SlmReference(spec, model, Tokenizer.from_str(ckpt["slm"]["tokenizer_json"]), tokenizer_spec=str(path))


def _load_hf(spec: str, path: Path) -> HFReference:
    from slm_cli.model.hf import require_hf, tokenizer_file

    transformers = require_hf(f"the Hugging Face reference {spec}")
    tokenizer_json = tokenizer_file(path, spec)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
    except Exception as e:  # unknown architecture, missing weights, not a causal LM...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SlmError(f"cannot load Hugging Face causal LM {spec} ({first}): pass a folder written by "
                       "save_pretrained of an AutoModelForCausalLM") from None
    return HFReference(spec, model, load_tokenizer(str(tokenizer_json)), tokenizer_spec=str(tokenizer_json))
