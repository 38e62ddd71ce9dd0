"""Top-r n-gram distributions of every training token, for the n-gram targets of arXiv 2407.02819
(AllNTs / CoCoNTs; docs/ngram.md).

Row i of the arrays is the n-gram distribution of token i of ``train.bin`` given the n−1 tokens
before it, c_i = (x_{i−n+1} … x_{i−1}): the r next tokens v with the largest count(c_i · v)
(ties: smaller id first) and their probabilities count(c_i · v) / count(c_i). These are the true
conditional probabilities, *not* renormalised over the top r: CoCoNTs' consistency (the mean of
its target over the positions sharing c equals y^all(c)) needs them. Rows i < n−1 (incomplete
context) and the slots of contexts with fewer than r distinct next tokens hold id 0 with
probability 0; an entry is real iff its probability is > 0. Counting covers the training split only.

The build is a sort, no Python loop over tokens: the n ids of an n-gram are packed into one
uint64 key (``bits`` = ceil(log2 V) bits per id, so n·bits ≤ 64), and

1. *count*: per chunk of positions, ``np.unique`` of the keys; the sorted (key, count) runs are
   merged as they come (a run is merged into the previous one while that one is at most twice
   its size, so every entry takes part in O(log chunks) merges);
2. *top r*: the counted keys are sorted by (context, −count, next id); the first r of each
   context, divided by the context's total, form a (contexts, r) table;
3. *scatter*: per chunk of positions, the context key of each position is looked up in the
   sorted distinct contexts (``np.searchsorted``) and its table row is copied to the outputs.

Memory: the token stream and the outputs are memory-mapped. Held in RAM are the count and context
tables, ≈ 100–135 bytes per distinct n-gram at the peak (the top-r sort; r = 8), and per-chunk
work arrays, ≈ 50 bytes per token of ``chunk_tokens``. Distinct n-grams are at most one per
position; ``shards`` > 1 splits the contexts by hash into that many shards, each counted and
scattered in its own passes over the tokens, which divides the table peak by ``shards``.

On disk, beside ``train.bin``::

    <prepared.dir>/ngram-n{n}-r{r}/ids.npy    uint16 (train_tokens, r) (uint32 if V > 65536)
                                   probs.npy  float16 (train_tokens, r) (ngram.dtype=float32: float32)
                                   meta.json  written last: its presence commits the folder
"""

from __future__ import annotations

import datetime
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slm_cli.config import is_int
from slm_cli.data.prepared import check_same_corpus, token_dtype
from slm_cli.data.sidecar import META, exclusive, load_array, read_meta, staged
from slm_cli.errors import SlmError
from slm_cli.ngram.keys import bits_per_token, check_key_width, pack, pack_context
from slm_cli.progress import track

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from slm_cli.data.prepared import PreparedData

FORMAT_VERSION = 1
NGRAM_FILES = {"ngram_ids": "ids.npy", "ngram_probs": "probs.npy"}
META_KEYS = ("format_version", "n", "r", "fingerprint", "tokenizer_sha256", "train_tokens", "vocab_size",
             "dtype", "contexts", "ngrams", "key", "seconds", "created")
PROB_DTYPES = ("float32", "float16")
# Probabilities in half precision unless asked (ngram.dtype=float32): at r = 8 and GPT-2's vocabulary a
# token costs 16 bytes of uint16 ids + 16 of float16 probabilities, not 48 (docs/ngram.md).
DEFAULT_DTYPE = "float16"
DEFAULT_CHUNK_TOKENS = 1 << 24


# ---- counting ---------------------------------------------------------------------------------
def _reduce(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum the counts of equal keys of a sorted key array."""
    if len(keys) == 0:
        return keys, counts
    starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
    return keys[starts], np.add.reduceat(counts, starts).astype(counts.dtype, copy=False)


def _merge(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    keys = np.concatenate((a[0], b[0]))
    counts = np.concatenate((a[1], b[1]))
    del a, b
    order = np.argsort(keys, kind="stable")  # timsort: two sorted runs merge in linear time
    return _reduce(keys[order], counts[order])


def shard_of(context_keys: np.ndarray, shards: int) -> np.ndarray:
    """Shard of each context: a multiplicative (Fibonacci) hash, so that shards are even in size
    however skewed the ids are. Every n-gram of a context lands in the context's shard."""
    mixed = context_keys * np.uint64(0x9E3779B97F4A7C15)  # wraps mod 2^64
    return (mixed >> np.uint64(32)) % np.uint64(shards)


def count_ngrams(tokens: np.ndarray, n: int, bits: int, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                 shard: tuple[int, int] = (0, 1), progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(keys, counts): the distinct packed n-grams of ``tokens`` whose context is in ``shard``
    (index, shards), sorted, and how often each occurs."""
    total = len(tokens)
    count_dtype = np.uint32 if total < 2**32 else np.uint64
    runs: list[tuple[np.ndarray, np.ndarray]] = []
    starts = range(n - 1, total, chunk_tokens)
    desc = f"counting {n}-grams" + (f" (shard {shard[0] + 1}/{shard[1]})" if shard[1] > 1 else "")
    for start in track(starts, desc, "chunk", disable=not progress):
        keys = pack(tokens, start, min(start + chunk_tokens, total), n, bits)
        if shard[1] > 1:
            keys = keys[shard_of(keys >> np.uint64(bits), shard[1]) == shard[0]]
        keys, counts = np.unique(keys, return_counts=True)
        runs.append((keys, counts.astype(count_dtype)))
        while len(runs) > 1 and len(runs[-2][0]) <= 2 * len(runs[-1][0]):
            runs.append(_merge(runs.pop(-2), runs.pop()))
    while len(runs) > 1:
        runs.append(_merge(runs.pop(-2), runs.pop()))
    return runs[0] if runs else (np.empty(0, np.uint64), np.empty(0, count_dtype))


def _bit_length(x: int) -> int:
    return max(1, int(x).bit_length())


def _sort_within_contexts(group: np.ndarray, counts: np.ndarray, nxt: np.ndarray,
                          bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group, count, next id) sorted by (group, −count, next id).

    When the group index, the rank of the count among the distinct counts (few: at most ~√(2N))
    and the id fit 64 bits together, one ``np.sort`` of a packed key does it (no argsort: numpy's
    SIMD sort); otherwise a three-key ``np.lexsort``, which is stable, so equal counts keep id order.
    """
    distinct = np.unique(counts)  # ascending
    top = len(distinct) - 1
    count_bits = _bit_length(top)
    if len(group) == 0 or _bit_length(int(group[-1])) + count_bits + bits > 64:
        order = np.lexsort((nxt, np.iinfo(counts.dtype).max - counts, group))
        return group[order], counts[order], nxt[order]
    rank = np.uint64(top) - np.searchsorted(distinct, counts).astype(np.uint64)  # 0 = the largest count
    key = (group.astype(np.uint64) << np.uint64(count_bits + bits)) | (rank << np.uint64(bits)) | nxt
    del rank
    key.sort()
    rank = (key >> np.uint64(bits)) & np.uint64((1 << count_bits) - 1)
    return (key >> np.uint64(count_bits + bits)).astype(np.int64), distinct[top - rank.astype(np.int64)], \
        key & np.uint64((1 << bits) - 1)


def top_r_table(keys: np.ndarray, counts: np.ndarray, bits: int, r: int, id_dtype: np.dtype,
                prob_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(contexts, ids, probs) from sorted n-gram counts: the distinct context keys, sorted, and per
    context its r most frequent next ids (ties: smaller id) with probability count / context total."""
    context = keys >> np.uint64(bits)
    first = np.concatenate(([True], context[1:] != context[:-1])) if len(keys) else np.empty(0, bool)
    starts = np.flatnonzero(first)
    contexts = context[starts]
    del context
    totals = np.add.reduceat(counts, starts).astype(np.float64) if len(keys) else np.empty(0)
    group = np.cumsum(first, dtype=np.int64) - 1
    del first
    group, counts, nxt = _sort_within_contexts(group, counts, keys & np.uint64((1 << bits) - 1), bits)
    rank = np.arange(len(group)) - starts[group]
    keep = rank < r
    row, slot = group[keep], rank[keep]
    del group, rank
    ids = np.zeros((len(contexts), r), dtype=id_dtype)
    probs = np.zeros((len(contexts), r), dtype=prob_dtype)
    ids[row, slot] = nxt[keep]
    p = (counts[keep] / totals[row]).astype(prob_dtype)
    # A real entry must stay > 0 (its probability marks it as real, see the module docstring):
    # float16 would round probabilities below 6e-8 to 0.
    probs[row, slot] = np.maximum(p, np.finfo(prob_dtype).smallest_subnormal)
    return contexts, ids, probs


def _rows(array: np.ndarray) -> np.ndarray:
    """A C-contiguous (M, r) array as M opaque r-element items: row gathers become 1-D takes."""
    return array.view(np.dtype((np.void, array.shape[1] * array.itemsize))).reshape(-1)


# ---- the build ----------------------------------------------------------------------------------
def check_settings(n: Any, r: Any, vocab_size: int | None = None, *, chunk_tokens: Any = DEFAULT_CHUNK_TOKENS,
                   shards: Any = 1, dtype: Any = DEFAULT_DTYPE) -> None:
    """User-facing checks of the settings (``vocab_size``: also r <= V and the key width)."""

    if not is_int(n) or n < 2:
        raise SlmError(f"ngram.n={n} must be an integer >= 2 (the context is the n-1 tokens before a token): "
                       "e.g. ngram.n=4")
    if not is_int(r) or r < 1 or (vocab_size is not None and r > vocab_size):
        bound = f"between 1 and the vocabulary size {vocab_size}" if vocab_size is not None else "a positive integer"
        raise SlmError(f"ngram.r={r} must be {bound} (the next tokens kept per context): e.g. ngram.r=8")
    if not is_int(chunk_tokens) or chunk_tokens < 1:
        raise SlmError(f"ngram.chunk_tokens={chunk_tokens} must be a positive integer: e.g. "
                       f"ngram.chunk_tokens={DEFAULT_CHUNK_TOKENS}")
    if not is_int(shards) or shards < 1:
        raise SlmError(f"ngram.shards={shards} must be a positive integer: e.g. ngram.shards=1 (one pass), "
                       "more to cut the memory peak")
    if dtype not in PROB_DTYPES:
        raise SlmError(f"ngram.dtype={dtype} is not supported: use one of {', '.join(PROB_DTYPES)}")
    if vocab_size is not None:
        check_key_width(n, vocab_size)


def id_dtype(vocab_size: int) -> np.dtype:
    """Token ids in the arrays take the prepared corpus's own token dtype."""
    return token_dtype(vocab_size)


def build_ngram(tokens: np.ndarray, vocab_size: int, n: int, r: int, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                shards: int = 1, dtype: str = DEFAULT_DTYPE, out: tuple[np.ndarray, np.ndarray] | None = None,
                progress: bool = False) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """(ids, probs, stats) of every position of ``tokens`` (see the module docstring). ``out`` lets
    the caller pass (e.g. memory-mapped) (len(tokens), r) arrays; stats: distinct contexts and n-grams.

    With ``shards`` > 1 the contexts are split by hash and each shard is counted, tabled and
    scattered in its own passes over ``tokens``: the tables, the memory peak, shrink ``shards``-fold."""
    check_settings(n, r, vocab_size, chunk_tokens=chunk_tokens, shards=shards, dtype=dtype)
    bits = check_key_width(n, vocab_size)
    total = len(tokens)
    if out is None:
        out = (np.empty((total, r), id_dtype(vocab_size)), np.empty((total, r), np.dtype(dtype)))
    ids, probs = out
    if (ids.dtype, probs.dtype) != (id_dtype(vocab_size), np.dtype(dtype)):
        raise ValueError(f"out arrays are {ids.dtype} and {probs.dtype}, the build writes "
                         f"{id_dtype(vocab_size)} ids and {dtype} probabilities")
    head = min(n - 1, total)
    ids[:head] = 0
    probs[:head] = 0
    stats = {"contexts": 0, "ngrams": 0}
    for shard in range(shards):
        keys, counts = count_ngrams(tokens, n, bits, chunk_tokens=chunk_tokens, shard=(shard, shards),
                                    progress=progress)
        stats["ngrams"] += len(keys)
        contexts, table_ids, table_probs = top_r_table(keys, counts, bits, r, id_dtype(vocab_size), np.dtype(dtype))
        stats["contexts"] += len(contexts)
        del keys, counts
        _scatter(tokens, n, bits, contexts, table_ids, table_probs, ids, probs, chunk_tokens=chunk_tokens,
                 shard=(shard, shards), progress=progress)
    return ids, probs, stats


def _scatter(tokens: np.ndarray, n: int, bits: int, contexts: np.ndarray, table_ids: np.ndarray,
             table_probs: np.ndarray, ids: np.ndarray, probs: np.ndarray, *, chunk_tokens: int,
             shard: tuple[int, int], progress: bool) -> None:
    """Copy each position's context row of the table (the positions whose context is in ``shard``)."""
    total = len(tokens)
    starts = range(n - 1, total, chunk_tokens)
    desc = f"writing top-{table_ids.shape[1]} rows" + (f" (shard {shard[0] + 1}/{shard[1]})" if shard[1] > 1 else "")
    for start in track(starts, desc, "chunk", disable=not progress):
        stop = min(start + chunk_tokens, total)
        context = pack_context(tokens, start, stop, n, bits)
        where = np.flatnonzero(shard_of(context, shard[1]) == shard[0]) if shard[1] > 1 else None
        if where is not None:
            context = context[where]
        # Looking up the chunk's distinct contexts in sorted order is ~10x faster than a binary
        # search per position (cache-friendly), and every position's context is in the table.
        queries, inverse = np.unique(context, return_inverse=True)
        row = np.searchsorted(contexts, queries)[inverse]
        del context, queries, inverse
        if where is None:
            np.take(_rows(table_ids), row, out=_rows(ids[start:stop]), mode="clip")
            np.take(_rows(table_probs), row, out=_rows(probs[start:stop]), mode="clip")
        else:
            ids[start + where] = table_ids[row]
            probs[start + where] = table_probs[row]


# ---- the folder ---------------------------------------------------------------------------------
def ngram_dir(prepared: PreparedData, n: int, r: int) -> Path:
    return prepared.dir / f"ngram-n{n}-r{r}"


def _command(n: int, r: int) -> str:
    return f"`slm ngram data=<same data> ngram.n={n} ngram.r={r}`"


def _read_meta(folder: Path, n: int, r: int) -> dict[str, Any]:
    def check(meta: dict[str, Any]) -> None:
        if meta["dtype"] not in PROB_DTYPES:
            raise ValueError(f"dtype {meta['dtype']!r} is not one of {', '.join(PROB_DTYPES)}")

    return read_meta(folder, META_KEYS, f"delete {folder} and run {_command(n, r)} again", check)


def load_ngram(prepared: PreparedData, n: int, r: int, path: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """{"ngram_ids", "ngram_probs"}: (train_tokens, r) memory-mapped arrays aligned with
    ``prepared``'s train.bin, checked against its length, tokenizer and corpus fingerprint."""
    folder = Path(path).expanduser() if path else ngram_dir(prepared, n, r)
    again = f"run {_command(n, r)} again"
    if not (folder / META).is_file():
        raise SlmError(f"no {n}-gram top-{r} arrays for {prepared.dir} ({folder / META} does not exist): "
                       f"run {_command(n, r)} first")
    meta = _read_meta(folder, n, r)
    if meta["format_version"] != FORMAT_VERSION or (meta["n"], meta["r"]) != (n, r):
        raise SlmError(f"{folder} holds format {meta['format_version']} n={meta['n']} r={meta['r']} arrays, not "
                       f"format {FORMAT_VERSION} n={n} r={r}: {again}")
    check_same_corpus(meta, prepared, f"n-gram arrays in {folder} were counted", again)
    total = int(prepared.meta["train_tokens"])
    expected = {"ngram_ids": id_dtype(prepared.vocab_size), "ngram_probs": np.dtype(meta["dtype"])}
    arrays = {}
    for key, file in NGRAM_FILES.items():
        array = load_array(folder / file, (total, r), expected[key], again, meta["train_tokens"])
        arrays[key] = array
    return arrays


def _current(prepared: PreparedData, folder: Path, n: int, r: int, dtype: str) -> bool:
    """Whether ``folder`` already holds loadable arrays of these settings for this corpus."""
    try:
        load_ngram(prepared, n, r, folder)
        return _read_meta(folder, n, r)["dtype"] == dtype
    except SlmError:
        return False


def write_ngram(prepared: PreparedData, n: int, r: int, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, shards: int = 1,
                dtype: str = DEFAULT_DTYPE, force: bool = False, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Build ``ngram-n{n}-r{r}/`` beside train.bin unless it already holds these arrays (``force``
    rebuilds). Arrays staged, moved into place, meta.json last (sidecar.staged). Returns (folder, meta)."""
    check_settings(n, r, prepared.vocab_size, chunk_tokens=chunk_tokens, shards=shards, dtype=dtype)
    folder = ngram_dir(prepared, n, r)
    with exclusive(folder):  # a second `slm ngram` on the same folder waits, then finds it built
        if not force and _current(prepared, folder, n, r, dtype):
            return folder, {**_read_meta(folder, n, r), "skipped": True}
        tokens = prepared.tokens("train")
        total = len(tokens)
        t0 = time.perf_counter()
        with staged(folder, NGRAM_FILES.values()) as stage:
            ids = np.lib.format.open_memmap(stage.dir / NGRAM_FILES["ngram_ids"], mode="w+",
                                            dtype=id_dtype(prepared.vocab_size), shape=(total, r))
            probs = np.lib.format.open_memmap(stage.dir / NGRAM_FILES["ngram_probs"], mode="w+",
                                              dtype=np.dtype(dtype), shape=(total, r))
            _, _, stats = build_ngram(tokens, prepared.vocab_size, n, r, chunk_tokens=chunk_tokens, shards=shards,
                                      dtype=dtype, out=(ids, probs), progress=progress)
            ids.flush()
            probs.flush()
            del ids, probs
            stage.meta = _meta(prepared, n, r, dtype, stats, chunk_tokens=chunk_tokens, shards=shards,
                               seconds=time.perf_counter() - t0)
    return folder, stage.meta


def _meta(prepared: PreparedData, n: int, r: int, dtype: str, stats: dict[str, int], *, chunk_tokens: int,
          shards: int, seconds: float) -> dict[str, Any]:
    bits = bits_per_token(prepared.vocab_size)
    return {
        "format_version": FORMAT_VERSION,
        "n": n,
        "r": r,
        "fingerprint": prepared.meta["fingerprint"],
        "tokenizer_sha256": prepared.meta["tokenizer_sha256"],
        "train_tokens": int(prepared.meta["train_tokens"]),
        "vocab_size": prepared.vocab_size,
        "dtype": dtype,
        "contexts": stats["contexts"],
        "ngrams": stats["ngrams"],
        "key": {"scheme": "packed-uint64", "bits_per_token": bits, "key_bits": n * bits,
                "order": "x[i-n+1] in the high bits ... x[i] in the low bits"},
        "chunk_tokens": chunk_tokens,  # how it was built (the arrays do not depend on these two)
        "shards": shards,
        "seconds": round(seconds, 3),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ---- `slm ngram` --------------------------------------------------------------------------------
def run_ngram(cfg: DictConfig) -> dict[str, Any]:
    """`slm ngram`: check the settings, prepare the corpus, build its top-r arrays and say what was done."""
    from slm_cli.data.prepare import prepare

    c = cfg.ngram
    check_settings(c.n, c.r, chunk_tokens=c.chunk_tokens, shards=c.shards, dtype=c.dtype)
    prepared = prepare(cfg.data, cfg.paths)
    folder, meta = write_ngram(prepared, int(c.n), int(c.r), chunk_tokens=int(c.chunk_tokens),
                               shards=int(c.shards), dtype=str(c.dtype), force=bool(c.force))
    if meta.get("skipped"):
        print(f"n-gram arrays {folder} are up to date ({meta['train_tokens']:,} tokens, n={meta['n']}, "
              f"r={meta['r']}): nothing to do (ngram.force=true rebuilds)")
    else:
        rate = meta["train_tokens"] / meta["seconds"] if meta["seconds"] > 0 else math.inf
        print(f"built {folder}: {meta['train_tokens']:,} tokens, {meta['contexts']:,} contexts, "
              f"{meta['ngrams']:,} distinct {meta['n']}-grams, top {meta['r']} ({meta['dtype']}), "
              f"{rate:,.0f} tokens/s")
    return {"folder": str(folder), **meta}
