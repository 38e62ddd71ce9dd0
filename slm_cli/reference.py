"""Reference models for RHO-1 (arXiv 2404.07965) and `slm score`, which stores their per-token
losses beside a prepared corpus.

A reference is a frozen causal LM that shares the training data's tokenizer: an slm checkpoint
(``*.ckpt``, or a run dir whose ``checkpoints/last.ckpt`` is used) or a Hugging Face causal-LM
folder (``save_pretrained`` output holding a ``tokenizer.json``; needs ``pip install 'slm[hf]'``).

Scoring (docs/rho1.md). The paper leaves the scoring context unspecified; *our choice* is sliding
windows of ``context`` tokens moved by ``stride`` (default ``context // 2``). The first window
scores all its labels; every later window scores only the labels past the previous window's end,
so each token outside the first window is predicted from at least ``context − stride + 1``
tokens. Position 0 has no context and holds NaN (training never predicts it: labels start at
window offset 1).

On disk, beside ``train.bin``::

    <prepared.dir>/ref-<name>/ref_loss.npy      float32 (train_tokens,)  −log p_ref(x_i | x_<i)
                             ref_entropy.npy   float32 (train_tokens,)  H(p_ref(· | x_<i))
                             meta.json         written last: its presence commits the folder
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from slm_cli.data.aligned import check_same_corpus, load_array
from slm_cli.data.tokenizer import RUN_DIR_CHECKPOINT, load_tokenizer, tokenizer_sha256
from slm_cli.errors import SlmError
from slm_cli.outputs import is_sharded_checkpoint, load_checkpoint, write_json

if TYPE_CHECKING:
    from omegaconf import DictConfig
    from tokenizers import Tokenizer

    from slm_cli.data.prepare import PreparedData
    from slm_cli.model.gpt import GPT

FORMAT_VERSION = 1
SCORE_FILES = {"ref_loss": "ref_loss.npy", "ref_entropy": "ref_entropy.npy"}
META_KEYS = ("format_version", "reference", "reference_describe", "tokenizer_sha256", "fingerprint",
             "train_tokens", "context", "stride", "created")
# float32 elements of one (rows, V) block when statistics are computed from full logits (~64 MB).
LOGITS_BLOCK = 1 << 24


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
        from slm_cli.flops import flops_per_token

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
        from slm_cli.loss import token_stats

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
        n = hf_matmul_params(model)
        super().__init__(
            spec, model, tokenizer, tokenizer_spec=tokenizer_spec, block_size=int(block_size),
            # The forward analogue of slm_cli/flops.py: 2·N (N: weights used in matmuls, the output
            # head once, no embedding lookups) + 4·L·T·d for QKᵀ and AV with T = the model's context.
            forward_flops_per_token=2 * n + 4 * layers * int(block_size) * d,
            describe=(f"Hugging Face {config.model_type} {spec} ({layers} layers, hidden {d}, "
                      f"{n / 1e6:.2f}M matmul params, context {block_size})"),
        )

    @torch.no_grad()
    def token_stats(self, input_ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        ids, y = input_ids.to(self.device), labels.to(self.device)
        logits = self.model(input_ids=ids, use_cache=False).logits[..., : self.vocab_size]
        loss, entropy = stats_from_logits(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        return loss.view(y.shape), entropy.view(y.shape)


def stats_from_logits(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row loss −log softmax(z)[y] and entropy H = lse − Σ_v p_v·z_v, in float32, in row blocks
    so that the float32 copy of the logits stays bounded."""
    m, v = logits.shape
    loss = torch.empty(m, dtype=torch.float32, device=logits.device)
    entropy = torch.empty_like(loss)
    rows = max(1, LOGITS_BLOCK // v)
    for s in range(0, m, rows):
        z = logits[s : s + rows].float()
        lse = torch.logsumexp(z, dim=-1)
        loss[s : s + rows] = lse - z.gather(1, labels[s : s + rows, None]).squeeze(1)
        entropy[s : s + rows] = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
    return loss, entropy


def hf_matmul_params(model: torch.nn.Module) -> int:
    """Weights that take part in matmuls: every ≥2-D parameter outside embedding lookups, plus the
    output head once (tied to the input embedding or not)."""
    seen: set[int] = set()
    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        for p in module.parameters(recurse=False):
            if p.dim() >= 2 and id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
    head = model.get_output_embeddings().weight
    return n + (head.numel() if id(head) not in seen else 0)


# ---- loading ---------------------------------------------------------------------------------
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

    from slm_cli.evaluate import load_model

    ckpt = load_checkpoint(path)
    model = load_model(ckpt)
    return SlmReference(spec, model, Tokenizer.from_str(ckpt["slm"]["tokenizer_json"]), tokenizer_spec=str(path))


def _load_hf(spec: str, path: Path) -> HFReference:
    try:
        import transformers
    except ImportError:
        raise SlmError(f"reference {spec} is a Hugging Face model but transformers is not installed: "
                       "pip install 'slm[hf]'") from None
    tokenizer_json = path / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise SlmError(f"Hugging Face reference {spec} has no tokenizer.json: save its fast tokenizer there "
                       "(AutoTokenizer.from_pretrained(...).save_pretrained(folder))")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
    except Exception as e:  # unknown architecture, missing weights, not a causal LM...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SlmError(f"cannot load Hugging Face causal LM {spec} ({first}): pass a folder written by "
                       "save_pretrained of an AutoModelForCausalLM") from None
    return HFReference(spec, model, load_tokenizer(str(tokenizer_json)), tokenizer_spec=str(tokenizer_json))


def default_name(spec: str) -> str:
    """Name of the score folder for a reference: the run dir's name (plus the checkpoint's stem
    unless it is last.ckpt), a checkpoint's stem, or a model folder's name."""
    path = Path(spec).expanduser().resolve()
    if path.exists() and path.parent.name == RUN_DIR_CHECKPOINT.parent.name:
        run = path.parent.parent.name
        name = run if path.name == RUN_DIR_CHECKPOINT.name else f"{run}-{path.stem}"
    else:
        name = path.stem if path.is_file() else path.name
    return sanitise(name)


def sanitise(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip("-.") or "reference"


# ---- scoring a token stream ------------------------------------------------------------------
def window_starts(n_tokens: int, context: int, stride: int) -> np.ndarray:
    """Starts of the scoring windows (``context`` inputs + 1): every ``stride`` tokens while a
    window fits, then one window flush with the end of the stream if tokens are left."""
    starts = np.arange(0, n_tokens - 1 - context + 1, stride, dtype=np.int64)
    if starts[-1] + context < n_tokens - 1:
        starts = np.append(starts, n_tokens - 1 - context)
    return starts


def _check_context(ref: ReferenceModel, context: int) -> None:
    if context > ref.block_size:
        raise SlmError(f"context={context} exceeds the context of reference {ref.spec} ({ref.block_size} tokens): "
                       f"set context<={ref.block_size}")


def score_stream(
    ref: ReferenceModel,
    tokens: np.ndarray,
    *,
    context: int,
    stride: int,
    batch_size: int,
    out: tuple[np.ndarray, np.ndarray] | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Reference loss and entropy of every token of ``tokens`` (float32, NaN at position 0).

    Windows as in :func:`window_starts`; window k scores the labels past window k−1's last label,
    so every token is scored once. ``out`` lets the caller pass (e.g. memory-mapped) arrays.
    """
    n = len(tokens)
    if n < 2:
        raise SlmError(f"the token stream has {n} tokens: scoring needs at least 2")
    if context < 1 or stride < 1:
        raise SlmError(f"context={context} and stride={stride} must be positive integers")
    _check_context(ref, context)
    context = min(context, n - 1)
    stride = min(stride, context)
    loss, entropy = out if out is not None else (np.empty(n, np.float32), np.empty(n, np.float32))
    loss[0] = entropy[0] = np.nan
    starts = window_starts(n, context, stride)
    ends = starts + context  # last label position of each window
    first_new = np.concatenate([[1], ends[:-1] + 1])  # first label position each window scores
    offsets = np.arange(context + 1, dtype=np.int64)
    batches = range(0, len(starts), batch_size)
    for b in tqdm(batches, desc=f"scoring {n:,} tokens", unit="batch", disable=not progress):
        pos = starts[b : b + batch_size, None] + offsets
        window = torch.from_numpy(np.asarray(tokens[pos]).astype(np.int64))
        if int(window.max()) >= ref.vocab_size:
            raise SlmError(f"token id {int(window.max())} is outside the vocabulary of reference {ref.spec} "
                           f"({ref.vocab_size}): prepare the data with data.tokenizer={ref.spec}")
        batch_loss, batch_entropy = ref.token_stats(window[:, :-1], window[:, 1:])
        labels = pos[:, 1:]
        keep = labels >= first_new[b : b + batch_size, None]
        loss[labels[keep]] = batch_loss.cpu().numpy()[keep]
        entropy[labels[keep]] = batch_entropy.cpu().numpy()[keep]
    return loss, entropy


# ---- the score folder ------------------------------------------------------------------------
def _missing(prepared: PreparedData, where: str) -> SlmError:
    return SlmError(
        f"selection=rho1 needs reference losses for {prepared.dir} ({where}): run `slm score data=<same data> "
        "ckpt_path=<reference checkpoint>` first and train with data.tokenizer=<reference checkpoint>, "
        "or set selection.reference.mode=online"
    )


def _find(prepared: PreparedData, path: str | None, name: str | None) -> Path:
    if path:
        return Path(path).expanduser()
    if name:
        return prepared.dir / f"ref-{sanitise(name)}"
    found = sorted(p for p in prepared.dir.glob("ref-*") if (p / "meta.json").is_file())
    if not found:
        raise _missing(prepared, "no ref-* folder")
    if len(found) > 1:
        names = ", ".join(p.name[len("ref-"):] for p in found)
        raise SlmError(f"{prepared.dir} holds reference losses of several references ({names}): "
                       f"choose one with selection.reference.name=<{found[0].name[len('ref-'):]}>")
    return found[0]


def load_scores(prepared: PreparedData, path: str | None = None, name: str | None = None) -> dict[str, np.ndarray]:
    """{"ref_loss", "ref_entropy"}: memory-mapped arrays aligned with ``prepared``'s train.bin,
    checked against its length, tokenizer and corpus fingerprint."""
    folder = _find(prepared, path, name)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise _missing(prepared, f"{meta_path} does not exist")
    try:
        meta = json.loads(meta_path.read_text())
        missing = [k for k in META_KEYS if k not in meta]
        if missing:
            raise ValueError(f"missing keys {', '.join(missing)}")
    except ValueError as e:
        raise SlmError(f"corrupt {meta_path} ({str(e).splitlines()[0]}): delete {folder} and run `slm score` "
                       "again") from None
    again = f"run `slm score data=<same data> ckpt_path={meta['reference']}` again"
    check_same_corpus(meta, prepared, f"reference losses in {folder} were computed", again,
                      tokenizer_fix=f", and train with data.tokenizer={meta['reference']}")
    n = int(prepared.meta["train_tokens"])
    arrays = {}
    for key, file in SCORE_FILES.items():
        array = load_array(folder / file, (n,), np.dtype(np.float32), again, meta["train_tokens"])
        arrays[key] = array
    return arrays


def _temp_path(folder: Path, file: str) -> Path:
    fd, path = tempfile.mkstemp(prefix=f".{file}.", suffix=".tmp", dir=folder)
    os.close(fd)
    return Path(path)


def write_scores(prepared: PreparedData, name: str, ref: ReferenceModel, *, context: int, stride: int,
                 batch_size: int, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Score train.bin into ``ref-<name>/``: arrays under temporary names, moved into place, meta.json last."""
    folder = prepared.dir / f"ref-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").unlink(missing_ok=True)  # un-commit: an old meta.json must not bless new arrays
    tokens = prepared.tokens("train")
    n = len(tokens)
    tmp = {key: _temp_path(folder, file) for key, file in SCORE_FILES.items()}
    try:
        arrays = {key: np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n,))
                  for key, path in tmp.items()}
        t0 = time.perf_counter()
        score_stream(ref, tokens, context=context, stride=stride, batch_size=batch_size,
                     out=(arrays["ref_loss"], arrays["ref_entropy"]), progress=progress)
        seconds = time.perf_counter() - t0
        mean_loss = float(np.nanmean(arrays["ref_loss"], dtype=np.float64))
        for array in arrays.values():
            array.flush()
        del arrays
        for key, file in SCORE_FILES.items():
            os.replace(tmp[key], folder / file)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "reference": ref.spec,
        "reference_describe": ref.describe,
        "tokenizer_sha256": ref.tokenizer_sha256,
        "fingerprint": prepared.meta["fingerprint"],
        "train_tokens": n,
        "context": context,
        "stride": stride,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(folder / "meta.json", meta)  # the commit
    return folder, {"mean_ref_loss": mean_loss, "seconds": seconds}


def _positive_or_null(cfg: DictConfig, key: str) -> int | None:
    value = cfg[key]
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SlmError(f"{key}={value} must be a positive integer or null: e.g. {key}=512")
    return int(value)


def score(cfg: DictConfig) -> dict[str, Any]:
    """`slm score`: tokenise the corpus with the reference's tokenizer and score its train split."""
    from slm_cli.config import check_data
    from slm_cli.data.prepare import prepare

    check_data(cfg.data)
    batch_size = _positive_or_null(cfg, "batch_size")
    if batch_size is None:
        raise SlmError("batch_size=null must be a positive integer: e.g. batch_size=16")
    context, stride = _positive_or_null(cfg, "context"), _positive_or_null(cfg, "stride")
    ref = load(str(cfg.ckpt_path))
    context = context or ref.block_size
    _check_context(ref, context)
    stride = stride or max(1, context // 2)
    if stride > context:
        raise SlmError(f"stride={stride} is larger than context={context}, which would leave tokens unscored: "
                       "set stride<=context or null (context // 2)")
    device = cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    ref.to(device)
    prepared = prepare(cfg.data, cfg.paths, tokenizer_spec=ref.tokenizer_spec)
    ref.check_data(prepared)
    name = sanitise(cfg.name) if cfg.name else default_name(ref.spec)
    folder, stats = write_scores(prepared, name, ref, context=context, stride=stride, batch_size=batch_size)
    n = int(prepared.meta["train_tokens"])
    rate = n / stats["seconds"] if stats["seconds"] > 0 else math.inf
    print(f"scored {folder}: {n:,} tokens, mean reference loss {stats['mean_ref_loss']:.4f}, "
          f"{rate:,.0f} tokens/s (context {context}, stride {stride})")
    return {"folder": str(folder), "tokens": n, "mean_ref_loss": stats["mean_ref_loss"], "tokens_per_s": rate}
