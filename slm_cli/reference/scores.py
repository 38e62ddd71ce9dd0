"""`slm score`'s output: reference losses stored beside a prepared corpus, for RHO-1.

Scoring (docs/rho1.md). RHO-1 compares the model's and the reference's loss on the same sample,
so by default `slm score` scores the corpus on a grid of non-overlapping windows of ``context``
tokens (``stride = context``) and training with those scores draws its windows from the same
grid (slm_cli/data/windows.py): every stored ℓ_ref was computed from exactly the context the
training window gives the model. A smaller ``stride`` gives sliding windows (each window scores
only the labels past the previous window's end, so every token has at least
``context − stride + 1`` tokens of context), useful for reference-only analysis but refused by
training, whose contexts would then differ. Position 0 has no context and holds NaN (training
never predicts it: labels start at window offset 1).

On disk, beside ``train.bin`` (committed as one folder, slm_cli/data/sidecar.py)::

    <prepared.dir>/ref-<name>/ref_loss.npy      float32 (train_tokens,)  −log p_ref(x_i | x_<i)
                             ref_entropy.npy   float32 (train_tokens,)  H(p_ref(· | x_<i))
                             meta.json         written last: its presence commits the folder
"""

from __future__ import annotations

import datetime
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from slm_cli.config import positive_int_or_null
from slm_cli.data.prepared import check_same_corpus
from slm_cli.data.sidecar import META, load_array, read_meta, staged
from slm_cli.errors import SlmError
from slm_cli.outputs import RUN_DIR_CHECKPOINT
from slm_cli.progress import track
from slm_cli.text import slug

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from slm_cli.data.prepared import PreparedData
    from slm_cli.reference.models import ReferenceModel

FORMAT_VERSION = 1
SCORE_FILES = {"ref_loss": "ref_loss.npy", "ref_entropy": "ref_entropy.npy"}
META_KEYS = ("format_version", "reference", "reference_describe", "tokenizer_sha256", "fingerprint",
             "train_tokens", "context", "stride", "created")


def default_name(spec: str) -> str:
    """Name of the score folder for a reference: the run dir's name (plus the checkpoint's stem
    unless it is last.ckpt), a checkpoint's stem, or a model folder's name."""
    path = Path(spec).expanduser().resolve()
    if path.exists() and path.parent.name == RUN_DIR_CHECKPOINT.parent.name:
        run = path.parent.parent.name
        name = run if path.name == RUN_DIR_CHECKPOINT.name else f"{run}-{path.stem}"
    else:
        name = path.stem if path.is_file() else path.name
    return slug(name, "reference")



# ---- scoring a token stream ------------------------------------------------------------------
def window_starts(n_tokens: int, context: int, stride: int) -> np.ndarray:
    """Starts of the scoring windows (``context`` inputs + 1): every ``stride`` tokens while a
    window fits, then one window flush with the end of the stream if tokens are left."""
    starts = np.arange(0, n_tokens - 1 - context + 1, stride, dtype=np.int64)
    if starts[-1] + context < n_tokens - 1:
        starts = np.append(starts, n_tokens - 1 - context)
    return starts


def check_context(ref: ReferenceModel, context: int) -> None:
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
    check_context(ref, context)
    context = min(context, n - 1)
    stride = min(stride, context)
    loss, entropy = out if out is not None else (np.empty(n, np.float32), np.empty(n, np.float32))
    loss[0] = entropy[0] = np.nan
    starts = window_starts(n, context, stride)
    ends = starts + context  # last label position of each window
    first_new = np.concatenate([[1], ends[:-1] + 1])  # first label position each window scores
    offsets = np.arange(context + 1, dtype=np.int64)
    batches = range(0, len(starts), batch_size)
    for b in track(batches, f"scoring {n:,} tokens", "batch", disable=not progress):
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
        return prepared.dir / f"ref-{slug(name, 'reference')}"
    found = sorted(p for p in prepared.dir.glob("ref-*") if (p / META).is_file())
    if not found:
        raise _missing(prepared, "no ref-* folder")
    if len(found) > 1:
        names = ", ".join(p.name[len("ref-"):] for p in found)
        raise SlmError(f"{prepared.dir} holds reference losses of several references ({names}): "
                       f"choose one with selection.reference.name=<{found[0].name[len('ref-'):]}>")
    return found[0]


def load_scores_and_meta(prepared: PreparedData, path: str | None = None,
                         name: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """{"ref_loss", "ref_entropy"}: memory-mapped arrays aligned with ``prepared``'s train.bin,
    checked against its length, tokenizer and corpus fingerprint; and the folder's meta.json
    (context, stride, reference, flops)."""
    folder = _find(prepared, path, name)
    if not (folder / META).is_file():
        raise _missing(prepared, f"{folder / META} does not exist")
    meta = read_meta(folder, META_KEYS, f"delete {folder} and run `slm score` again")
    again = f"run `slm score data=<same data> ckpt_path={meta['reference']}` again"
    check_same_corpus(meta, prepared, f"reference losses in {folder} were computed", again,
                      tokenizer_fix=f", and train with data.tokenizer={meta['reference']}")
    n = int(prepared.meta["train_tokens"])
    arrays = {}
    for key, file in SCORE_FILES.items():
        array = load_array(folder / file, (n,), np.dtype(np.float32), again, meta["train_tokens"])
        arrays[key] = array
    return arrays, meta


def write_scores(prepared: PreparedData, name: str, ref: ReferenceModel, *, context: int, stride: int,
                 batch_size: int, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Score train.bin into ``ref-<name>/``, committed as one folder (slm_cli/data/sidecar.py)."""
    folder = prepared.dir / f"ref-{name}"
    tokens = prepared.tokens("train")
    n = len(tokens)
    with staged(folder, SCORE_FILES.values()) as stage:
        arrays = {key: np.lib.format.open_memmap(stage.dir / file, mode="w+", dtype=np.float32, shape=(n,))
                  for key, file in SCORE_FILES.items()}
        t0 = time.perf_counter()
        score_stream(ref, tokens, context=context, stride=stride, batch_size=batch_size,
                     out=(arrays["ref_loss"], arrays["ref_entropy"]), progress=progress)
        seconds = time.perf_counter() - t0
        mean_loss = float(np.nanmean(arrays["ref_loss"], dtype=np.float64))
        for array in arrays.values():
            array.flush()
        del arrays
        stage.meta = {
            "format_version": FORMAT_VERSION,
            "reference": ref.spec,
            "reference_describe": ref.describe,
            "tokenizer_sha256": ref.tokenizer_sha256,
            "fingerprint": prepared.meta["fingerprint"],
            "train_tokens": n,
            "context": context,
            "stride": stride,
            # The reference's forward work: every window is one forward over `context` tokens.
            "flops": float(len(window_starts(n, min(context, n - 1), min(stride, context)))
                           * min(context, n - 1) * ref.forward_flops_per_token),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
    return folder, {"mean_ref_loss": mean_loss, "seconds": seconds}


# ---- `slm score` ------------------------------------------------------------------------------------
def scoring_grid(ref: ReferenceModel, context: int | None, stride: int | None) -> tuple[int, int]:
    """(context, stride) of `slm score`: the reference's block size and a stride of one context
    unless set (the grid training draws its windows from), checked against the reference."""
    context = context or ref.block_size
    check_context(ref, context)
    stride = stride or context
    if stride > context:
        raise SlmError(f"stride={stride} is larger than context={context}, which would leave tokens unscored: "
                       "set stride<=context or null (= context)")
    return context, stride


def run_score(cfg: DictConfig) -> dict[str, Any]:
    """`slm score`: tokenise the corpus with the reference's tokenizer, score its train split on
    ``cfg.device`` (null: cuda if available) and say what was done."""
    from slm_cli.data.prepare import prepare
    from slm_cli.reference.models import load

    batch_size = positive_int_or_null("batch_size", cfg.batch_size, 16)
    if batch_size is None:
        raise SlmError("batch_size=null must be a positive integer: e.g. batch_size=16")
    context = positive_int_or_null("context", cfg.context)
    stride = positive_int_or_null("stride", cfg.stride)
    ref = load(str(cfg.ckpt_path))
    context, stride = scoring_grid(ref, context, stride)
    ref.to(cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    prepared = prepare(cfg.data, cfg.paths, tokenizer_spec=ref.tokenizer_spec)
    ref.check_data(prepared)
    name = slug(cfg.name, "reference") if cfg.name else default_name(ref.spec)
    folder, stats = write_scores(prepared, name, ref, context=context, stride=stride, batch_size=batch_size)
    n = int(prepared.meta["train_tokens"])
    rate = n / stats["seconds"] if stats["seconds"] > 0 else math.inf
    print(f"scored {folder}: {n:,} tokens, mean reference loss {stats['mean_ref_loss']:.4f}, "
          f"{rate:,.0f} tokens/s (context {context}, stride {stride})")
    return {"folder": str(folder), "tokens": n, "mean_ref_loss": stats["mean_ref_loss"], "tokens_per_s": rate}
