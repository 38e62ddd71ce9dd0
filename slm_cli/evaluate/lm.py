"""slm's GPT as an lm-evaluation-harness (lm-eval) model, registered as ``"slm"``.

:class:`SlmLM` is an lm-eval ``LM`` around slm's own GPT and the tokenizer its checkpoint carries,
with no export to another format: ``loglikelihood`` (multiple-choice and cloze tasks),
``loglikelihood_rolling`` (perplexity tasks) and greedy ``generate_until``. Inputs longer than the
model's ``block_size`` keep their last ``block_size`` tokens, as lm-eval's own models do.

lm-eval is an optional extra (``pip install 'slm[eval]'``); import slm_cli/evaluate/harness.py (which
imports this module) for a one-line :class:`SlmError` without it or with too old a release.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tokenizers import Tokenizer

from slm_cli.data.tokenizer import eos_id
from slm_cli.errors import SlmError
from slm_cli.model.generate import generate
from slm_cli.model.gpt import GPT
from slm_cli.model.load import checkpoint_file, load_model
from slm_cli.outputs import load_checkpoint
from slm_cli.progress import track


def from_checkpoint(ckpt: dict[str, Any]) -> tuple[GPT, Tokenizer, str | None]:
    """The model, tokenizer and end-of-text token (null: the tokenizer's usual one) of a loaded checkpoint."""
    data = (ckpt["slm"].get("config") or {}).get("data") or {}
    return load_model(ckpt), Tokenizer.from_str(ckpt["slm"]["tokenizer_json"]), data.get("eos_token")


@register_model("slm")
class SlmLM(TemplateLM):
    """slm's GPT as an lm-eval model: ``lm_eval.simple_evaluate(model="slm", model_args={"ckpt_path":
    ...})`` once this module is imported, or ``SlmLM(model=gpt, tokenizer=tok)`` in Python."""

    def __init__(self, ckpt_path: str | None = None, batch_size: int | str = 16, device: str | None = None,
                 model: GPT | None = None, tokenizer: Tokenizer | None = None, eos_token: str | None = None,
                 **_: Any) -> None:  # lm-eval also passes max_batch_size, which a fixed batch ignores
        super().__init__()
        if model is None or tokenizer is None:
            if ckpt_path is None:
                raise SlmError("the slm lm-eval model needs ckpt_path=<run dir or checkpoint>")
            model, tokenizer, eos_token = from_checkpoint(load_checkpoint(checkpoint_file(ckpt_path)))
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise SlmError(f"batch_size={batch_size} is not a positive integer: set e.g. batch_size=16")
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self._device)
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        # Training appends this token after every document, so it is the model's "start of text" too.
        self._eot = eos_id(tokenizer, eos_token)

    # ---- what TemplateLM builds on ------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_: Any) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def get_model_info(self) -> dict[str, Any]:
        return {"model_num_parameters": self.model.num_params(), "block_size": self.max_length}

    @torch.no_grad()
    def _log_probs(self, rows: list[list[int]], n_scored: list[int]) -> list[torch.Tensor]:
        """Per row, the log-softmax over the real vocabulary at its last ``n`` positions, (n, V).

        Rows are right-padded into one batch: under causal attention a position never sees the
        padding after it. Only the scored positions go through the LM head, so a (B, T, V) tensor
        is never built."""
        width = max(map(len, rows))
        batch = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            batch[i, : len(row)] = torch.tensor(row)
        hidden = self.model(batch.to(self._device))
        picked = torch.cat([hidden[i, len(row) - n: len(row)]
                            for i, (row, n) in enumerate(zip(rows, n_scored, strict=True))])
        weight = self.model.lm_head.weight[: self.model.config.vocab_size]  # padded rows are no tokens
        log_probs = F.log_softmax((picked @ weight.T).float(), dim=-1).cpu()
        return list(log_probs.split(n_scored))

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **_: Any) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding gives the continuation) per request.

        The model reads at most ``block_size`` tokens: a row is the last ``block_size`` tokens before
        the end of the continuation (the context cropped on the left), as in lm-eval's own models. A
        continuation longer than that is scored in consecutive pieces of ``block_size`` tokens, each
        read with the tokens just before it (as lm-eval's rolling windows split a document)."""
        block = self.max_length
        pieces = []  # (request index, row, number of scored tokens at the row's end, those tokens)
        for r, (_, context, continuation) in enumerate(requests):
            tokens = context + continuation
            for start in range(len(context), len(tokens), block):
                end = min(start + block, len(tokens))
                pieces.append((r, tokens[:end][-(block + 1):][:-1], end - start, tokens[start:end]))
        logprob = [0.0] * len(requests)
        greedy = [True] * len(requests)
        # Longest first, as lm-eval's models do: batches of similar lengths, and the largest batch first,
        # so running out of memory shows at once.
        pieces.sort(key=lambda piece: -len(piece[1]))
        for start in track(range(0, len(pieces), self.batch_size), "slm loglikelihood", "batch", disable=disable_tqdm):
            batch = pieces[start: start + self.batch_size]
            log_probs = self._log_probs([row for _, row, _, _ in batch], [n for _, _, n, _ in batch])
            for (r, _, _, scored), lp in zip(batch, log_probs, strict=True):
                target = torch.tensor(scored)
                logprob[r] += float(lp.gather(1, target[:, None]).sum())
                greedy[r] = greedy[r] and bool((lp.argmax(dim=-1) == target).all())
        for r, (key, _, _) in enumerate(requests):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, (logprob[r], greedy[r]))
        return list(zip(logprob, greedy, strict=True))

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """log p(text) of whole documents, in disjoint windows of ``block_size`` tokens, the first
        conditioned on the end-of-text token (lm-eval's rolling windows, as its HF model)."""
        results = []
        for request in track(requests, "slm loglikelihood_rolling", "document", disable=disable_tqdm):
            (text,) = request.args
            windows = [(None, *lm_utils.make_disjoint_window(pair)) for pair in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            total = sum(logprob for logprob, _ in self._loglikelihood_tokens(windows, disable_tqdm=True))
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return results

    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding (sampling settings are ignored) until a stop string, the end-of-text token
        or ``max_gen_toks`` new tokens; the context keeps its last ``block_size`` tokens."""
        outputs = []
        for request in track(requests, "slm generate_until", "request", disable=disable_tqdm):
            context, kwargs = request.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ids = self.tok_encode(context) or [self._eot]  # an empty context: a new document
            new: list[int] = []
            text = ""
            # One token per generate() call (greedy, temperature 0; it keeps the last block_size tokens):
            # generate() stops only at an end-of-text id, while a stop string needs the text decoded
            # after every token, so the loop stays here.
            for _ in range(int(kwargs.get("max_gen_toks", 256))):
                x = torch.tensor([ids + new], device=self._device)
                token = int(generate(self.model, x, 1, temperature=0)[0, 0])
                if token == self._eot:
                    break
                new.append(token)
                text = self.tok_decode(new)
                if any(stop in text for stop in until):
                    break
            for stop in until:
                text = text.split(stop)[0]
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", (context, kwargs), text)
        return outputs
