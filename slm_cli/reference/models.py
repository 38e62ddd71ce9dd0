"""Reference models for RHO-1 (arXiv 2404.07965) and the KD teacher: frozen causal LMs that score tokens.

A reference shares the training data's tokenizer and is whatever slm_cli/model/load.py's
:func:`~slm_cli.model.load.locate` finds: an slm checkpoint (``*.ckpt``, a run dir whose
``checkpoints/last.ckpt`` is used, or a sharded folder) or a Hugging Face causal-LM folder
(``save_pretrained`` output holding a ``tokenizer.json``; needs ``pip install 'slm[hf]'``). It runs
online during training (selection.reference.mode=online, or target=kd's teacher) or once over the
corpus through `slm score` (slm_cli/reference/scores.py). Each reference knows the setting that
named it (``key``), and its checks (tokenizer, context) name that setting.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import Tensor

from slm_cli.data.tokenizer import load_tokenizer, tokenizer_sha256
from slm_cli.errors import SlmError
from slm_cli.flops import flops_per_token, hf_forward_flops_per_token, hf_matmul_params
from slm_cli.loss import logits_stats, model_token_stats
from slm_cli.model.load import TokenizerId, check_context, check_tokenizer, load_slm, locate

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from slm_cli.data.prepared import PreparedData
    from slm_cli.model.gpt import GPT

R = TypeVar("R")
# use(rows, block): block(r) gives the (len(r), V) logits of rows r; see ReferenceModel.with_logit_blocks.
LogitBlocks = Callable[[int, Callable[[slice], Tensor]], R]


class ReferenceModel:
    """A frozen causal LM that scores tokens: per-token loss and predictive entropy, no gradient."""

    kind = "base"

    def __init__(self, spec: str, model: torch.nn.Module, tokenizer: Tokenizer, *, tokenizer_spec: str,
                 block_size: int, forward_flops_per_token: float, describe: str, key: str = "ckpt_path") -> None:
        self.spec = spec  # what the user passed, as the setting ``key``
        self.key = key
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.tokenizer_sha256 = tokenizer_sha256(tokenizer)
        self.tokenizer_spec = tokenizer_spec  # what `prepare` / data.tokenizer loads the same tokenizer from
        self.vocab_size = tokenizer.get_vocab_size()  # the real vocabulary (no model padding)
        self.tokenizer_id = TokenizerId(self.tokenizer_sha256, self.vocab_size, f"{key}={spec}")
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

    def with_logit_blocks(self, input_ids: Tensor, use: LogitBlocks[R]) -> R:
        """``use(rows, block)`` for the B·T rows of (B, T) ``input_ids``, where ``block(r)`` gives the
        logits of rows ``r`` over the tokenizer's vocabulary (padded head rows cut), on the model's
        device: what a consumer of whole distributions (the KD teacher's top k) needs, without any
        model's kind leaking out."""
        raise NotImplementedError

    def check_data(self, prepared: PreparedData) -> None:
        """The data must be tokenised with the reference's own tokenizer, or its scores mean nothing."""
        check_tokenizer(self.tokenizer_id, TokenizerId.of_data(prepared), key=self.key, spec=self.spec)

    def check_context(self, tokens: int, *, what: str | None = None, fix: str | None = None) -> None:
        """Windows of ``tokens`` tokens fit the reference's context (default: training windows)."""
        check_context(tokens, self.block_size, key=self.key, spec=self.spec, what=what, fix=fix)


class SlmReference(ReferenceModel):
    """An slm GPT. Its loss is the one `slm train`/`slm eval` report: softmax over the padded head."""

    kind = "slm"

    def __init__(self, spec: str, model: GPT, tokenizer: Tokenizer, *, tokenizer_spec: str | None = None,
                 key: str = "ckpt_path") -> None:
        cfg = model.config
        if tokenizer.get_vocab_size() > cfg.vocab_size:
            raise SlmError(f"{key}={spec}: its tokenizer has {tokenizer.get_vocab_size()} tokens but its model only "
                           f"{cfg.vocab_size}: pass a checkpoint written by `slm train`")
        super().__init__(
            spec, model, tokenizer, tokenizer_spec=tokenizer_spec or spec, block_size=cfg.block_size, key=key,
            # Forward only: one third of the 6N + 12·L·T·d training convention of slm_cli/flops.py.
            forward_flops_per_token=flops_per_token(cfg) / 3,
            describe=(f"slm GPT {spec} ({cfg.n_layer} layers, n_embd {cfg.n_embd}, "
                      f"{model.num_params() / 1e6:.2f}M params, context {cfg.block_size})"),
        )

    @torch.no_grad()
    def token_stats(self, input_ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        y = labels.to(self.device)
        stats = model_token_stats(self.model, input_ids.to(self.device), y, entropy=True)
        return stats.loss.view(y.shape), stats.entropy.view(y.shape)

    @torch.no_grad()
    def with_logit_blocks(self, input_ids: Tensor, use: LogitBlocks[R]) -> R:
        # The GPT hands its head the final hidden states: logits are made block by block, so no
        # (M, Vp) logits exist at once. The padded head is multiplied whole (the FLOPs that
        # forward_flops_per_token counts) and its unused columns cut.
        vocab = self.vocab_size

        def head(hidden: Tensor, weight: Tensor) -> R:
            h = hidden.reshape(-1, hidden.shape[-1])
            return use(h.shape[0], lambda rows: (h[rows] @ weight.to(h.dtype).T)[:, :vocab])

        return self.model(input_ids.to(self.device), head=head)


class HFReference(ReferenceModel):
    """A Hugging Face causal LM. Logits are cut to the tokenizer's vocabulary before the softmax:
    models often pad their embedding matrix (e.g. to a multiple of 64) with rows no token uses."""

    kind = "hf"

    def __init__(self, spec: str, model: torch.nn.Module, tokenizer: Tokenizer, *, tokenizer_spec: str,
                 key: str = "ckpt_path") -> None:
        config = model.config
        model_vocab = model.get_output_embeddings().weight.shape[0]
        if tokenizer.get_vocab_size() > model_vocab:
            raise SlmError(f"{key}={spec}: its tokenizer.json has {tokenizer.get_vocab_size()} tokens but the model's "
                           f"output layer only {model_vocab}: save the tokenizer the model was trained with")
        block_size = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        if not block_size:
            raise SlmError(f"{key}={spec}: its config.json names no context length (max_position_embeddings): "
                           "set max_position_embeddings in it")
        layers, d = config.num_hidden_layers, config.hidden_size
        super().__init__(
            spec, model, tokenizer, tokenizer_spec=tokenizer_spec, block_size=int(block_size), key=key,
            forward_flops_per_token=hf_forward_flops_per_token(model, int(block_size)),
            describe=(f"Hugging Face {config.model_type} {spec} ({layers} layers, hidden {d}, "
                      f"{hf_matmul_params(model) / 1e6:.2f}M matmul params, context {block_size})"),
        )

    def _logits(self, input_ids: Tensor) -> Tensor:
        """(B·T, V) logits, the padded rows of the output layer cut."""
        logits = self.model(input_ids=input_ids.to(self.device), use_cache=False).logits
        return logits.reshape(-1, logits.shape[-1])[:, : self.vocab_size]

    @torch.no_grad()
    def token_stats(self, input_ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        y = labels.to(self.device)
        stats = logits_stats(self._logits(input_ids), y.reshape(-1))
        return stats.loss.view(y.shape), stats.entropy.view(y.shape)

    @torch.no_grad()
    def with_logit_blocks(self, input_ids: Tensor, use: LogitBlocks[R]) -> R:
        flat = self._logits(input_ids)
        return use(flat.shape[0], lambda rows: flat[rows])


def load(spec: str, key: str = "ckpt_path") -> ReferenceModel:
    """The model ``key=spec`` names (slm_cli/model/load.py's :func:`locate`), on the CPU."""
    spec = str(spec)
    path, hugging_face = locate(spec, key)
    if hugging_face:
        return _load_hf(spec, path, key)
    from tokenizers import Tokenizer

    model, entry = load_slm(path, key)
    return SlmReference(spec, model, Tokenizer.from_str(entry["tokenizer_json"]), tokenizer_spec=str(path), key=key)


def _load_hf(spec: str, path: Path, key: str) -> HFReference:
    from slm_cli.model.hf import require_hf, tokenizer_file

    transformers = require_hf(f"{key}={spec} (a Hugging Face model)")
    tokenizer_json = tokenizer_file(path, spec)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
    except Exception as e:  # unknown architecture, missing weights, not a causal LM...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SlmError(f"{key}={spec}: cannot load it as a Hugging Face causal LM ({first}): pass {key}=<a folder "
                       "written by save_pretrained of an AutoModelForCausalLM>") from None
    return HFReference(spec, model, load_tokenizer(str(tokenizer_json)), tokenizer_spec=str(tokenizer_json), key=key)
