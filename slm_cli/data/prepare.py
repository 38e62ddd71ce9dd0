"""Build a prepared corpus: tokenise the text once into the format of slm_cli/data/prepared.py.

The folder is committed as one (slm_cli/data/sidecar.py): every file is staged and moved into
place, ``meta.json`` last, and its input fingerprint lets a repeated ``prepare`` return at once.
:func:`prepare` is every command's entry point: one corpus here, ``data=mix`` through
slm_cli/data/mixture.py, which prepares each of its sources through :func:`prepare` again.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import json
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from tokenizers import Tokenizer

from slm_cli.config import check_data
from slm_cli.data.mixture import prepare_mixture
from slm_cli.data.prepared import (
    FILES,
    FORMAT_VERSION,
    SPLITS,
    PreparedData,
    TokenWriter,
    load_prepared,
    prepared_meta,
    token_dtype,
    try_load,
)
from slm_cli.data.sidecar import META, exclusive, staged
from slm_cli.data.sources import (
    encoding_errors,
    load_documents,
    source_description,
    source_fingerprint,
    source_name,
    text_batches,
)
from slm_cli.data.tokenizer import eos_id, load_tokenizer, tokenizer_sha256, train_bpe
from slm_cli.progress import Progress

# Below this many documents a document-level split is too coarse; split the token stream instead.
MIN_DOCS_FOR_DOC_SPLIT = 20
BATCH_DOCS = 1000  # documents per encode_batch call (what one thread encodes at a time)


def _settings(data_cfg: DictConfig, tokenizer: str) -> dict[str, Any]:
    """The settings that determine the prepared tokens (validated; recorded in meta.json)."""
    val_fraction = float(data_cfg.val_fraction)  # checked by config.check_data
    return {
        "source": data_cfg.source,
        "path": data_cfg.get("path") if data_cfg.source == "files" else None,
        "hub": [data_cfg.hub_name, data_cfg.hub_config, data_cfg.hub_split]
        if data_cfg.source == "hub"
        else None,
        "text_field": data_cfg.text_field,
        "sample_by": data_cfg.sample_by,
        "encoding_errors": encoding_errors(data_cfg),  # in the fingerprint through source_fingerprint
        "max_bytes": data_cfg.max_bytes,
        "val_fraction": val_fraction,
        "tokenizer": tokenizer,
        "vocab_size": int(data_cfg.vocab_size) if tokenizer == "bpe" else None,
        "eos_token": data_cfg.eos_token,
    }


def _fingerprint(source_fp: str, tokenizer_identity: str, settings: dict[str, Any]) -> str:
    parts = [FORMAT_VERSION, source_fp, tokenizer_identity, settings["eos_token"], settings["val_fraction"]]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _threads(requested: int | None) -> int:
    """Tokenisation threads: data.num_proc, or every core this process may run on."""
    return max(1, requested or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


@contextlib.contextmanager
def _serial_tokenizers() -> Iterator[None]:
    """Each encode_batch call encodes serially in its own thread (its GIL released), so that
    data.num_proc threads use that many cores, and no more (the tokenizer's own thread pool would
    spread every call over all of them)."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _flatten(encodings: list[Any], eos: int) -> tuple[np.ndarray, np.ndarray]:
    """(stream, lengths): the documents' ids, each followed by ``eos``, as one uint32 array, and each
    document's length in it."""
    ids = [e.ids for e in encodings]
    lengths = np.fromiter((len(i) + 1 for i in ids), dtype=np.int64, count=len(ids))
    ends = np.cumsum(lengths)
    stream = np.full(int(ends[-1]) if len(ends) else 0, eos, dtype=np.uint32)
    body = np.ones(len(stream), dtype=bool)
    body[ends - 1] = False
    stream[body] = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32, count=len(stream) - len(ids))
    return stream, lengths


def _encoded(docs: Any, tok: Tokenizer, eos: int, threads: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """:func:`_flatten` of every batch of BATCH_DOCS documents, in corpus order. ``threads`` batches
    are encoded at once while this thread flattens and writes the finished ones; at most
    ``threads`` + 1 batches are held."""
    # Literal "<|endoftext|>" inside a document is text, not a separator (GPT-2's encode_ordinary).
    tok.encode_special_tokens = True

    def encode(texts: list[str]) -> list[Any]:
        return tok.encode_batch(texts, add_special_tokens=False)

    pending: collections.deque = collections.deque()
    with _serial_tokenizers(), ThreadPoolExecutor(threads) as pool, \
            Progress(len(docs), "tokenising", "doc") as progress:
        for texts in itertools.chain(text_batches(docs, BATCH_DOCS), [None]):
            if texts is not None:
                pending.append(pool.submit(encode, texts))
            while pending and (len(pending) > threads or texts is None):
                stream, lengths = _flatten(pending.popleft().result(), eos)
                yield stream, lengths
                progress.update(len(lengths), tokens=len(stream))


def _val_documents(n_docs: int, val_fraction: float) -> np.ndarray | None:
    """Which documents are held out: with enough documents, a seeded choice of ``val_fraction`` of
    them (kept in corpus order when written); None below MIN_DOCS_FOR_DOC_SPLIT, where the last
    ``val_fraction`` of the token stream is held out instead (:func:`_hold_out_tail`)."""
    if n_docs < MIN_DOCS_FOR_DOC_SPLIT:
        return None
    from datasets import Dataset

    n_val = min(max(math.ceil(val_fraction * n_docs), 1), n_docs - 1)
    split = Dataset.from_dict({"i": np.arange(n_docs)}).train_test_split(test_size=n_val, seed=0)
    held = np.zeros(n_docs, dtype=bool)
    held[np.asarray(split["test"]["i"])] = True
    return held


def _write_splits(folder: Path, batches: Iterator[tuple[np.ndarray, np.ndarray]], held: np.ndarray | None,
                  val_fraction: float, dtype: np.dtype) -> dict[str, int]:
    """Write train.bin and val.bin into ``folder`` in one pass over the encoded batches; their token counts."""
    paths = {split: folder / f"{split}.bin" for split in SPLITS}
    with TokenWriter(paths["train"], dtype) as train, TokenWriter(paths["val"], dtype) as val:
        first = 0
        for stream, lengths in batches:
            if held is None:
                train.write(stream)
            else:
                to_val = np.repeat(held[first : first + len(lengths)], lengths)
                train.write(stream[~to_val])
                val.write(stream[to_val])
            first += len(lengths)
    counts = {"train": train.tokens, "val": val.tokens}
    return counts if held is not None else _hold_out_tail(paths, counts["train"], val_fraction, dtype)


def _hold_out_tail(paths: dict[str, Path], total: int, val_fraction: float, dtype: np.dtype) -> dict[str, int]:
    """Move the last ``val_fraction`` of the stream written to train.bin into val.bin."""
    n_val = min(max(round(val_fraction * total), 1), total - 1)  # total >= 2: a token and its EOS at least
    with TokenWriter(paths["val"], dtype) as val:
        val.write(np.memmap(paths["train"], dtype=dtype, mode="r")[total - n_val :])
    os.truncate(paths["train"], (total - n_val) * dtype.itemsize)
    return {"train": total - n_val, "val": n_val}


def _same_tokens(meta: dict, sha: str, source_fp: str, eos: int, val_fraction: float) -> bool:
    """Whether a prepared folder holds exactly the tokens this tokenizer would produce there."""
    settings = meta["settings"] if isinstance(meta["settings"], dict) else {}
    return (meta["tokenizer_sha256"], meta["source_fingerprint"], meta["eos_id"], settings.get("val_fraction")) == (
        sha, source_fp, eos, val_fraction,
    )  # fmt: skip


def prepare(
    data_cfg: DictConfig, paths_cfg: DictConfig, *, tokenizer_spec: str | None = None
) -> PreparedData:
    """Tokenise the configured corpus into ``{paths.data_dir}/{name}/`` unless it is already there.

    ``tokenizer_spec`` overrides data.tokenizer. A tokenizer other than the trained bpe gets its
    own ``{name}.tok-{sha}`` folder so it never overwrites the default data, unless the default
    folder already holds the same tokens (e.g. `slm eval` with a model trained on that folder).
    """
    check_data(data_cfg)
    if data_cfg.source == "mix":  # data=mix: several sources in one folder, each prepared by this function
        return prepare_mixture(data_cfg, paths_cfg, prepare, tokenizer_spec=tokenizer_spec)
    out = Path(paths_cfg.data_dir) / source_name(data_cfg)
    spec = str(tokenizer_spec or data_cfg.tokenizer)
    settings = _settings(data_cfg, spec)
    source_fp = source_fingerprint(data_cfg)
    tok = None if spec == "bpe" else load_tokenizer(spec)
    if tok is None:
        identity = f"bpe:{settings['vocab_size']}"
    else:
        identity = tokenizer_sha256(tok)
        # Never overwrite data prepared with another tokenizer: an external tokenizer gets its own
        # folder, unless the plain folder already holds exactly these tokens.
        base = try_load(out)
        eos = eos_id(tok, data_cfg.eos_token)
        if base and _same_tokens(base.meta, identity, source_fp, eos, settings["val_fraction"]):
            return base
        out = out.with_name(f"{out.name}.tok-{identity[:8]}")
    fingerprint = _fingerprint(source_fp, identity, settings)
    with exclusive(out):  # the first process builds; the others wait, then find it ready
        # A corrupt or inconsistent folder is an error, not silently rebuilt: something other than
        # `slm prepare` changed it, and the user should know before anything overwrites it.
        existing = load_prepared(out) if (out / META).exists() else None
        if existing and existing.meta["fingerprint"] == fingerprint:
            return existing
        return _build(data_cfg, out, tok, spec, settings, fingerprint, source_fp)


def _build(
    data_cfg: DictConfig,
    out: Path,
    tok: Tokenizer | None,
    spec: str,
    settings: dict[str, Any],
    fingerprint: str,
    source_fp: str,
) -> PreparedData:
    with staged(out, FILES) as stage:  # the folder is "not prepared" until its meta.json is written
        docs = load_documents(data_cfg, out.parent / ".hf_cache")
        if tok is None:
            tok = train_bpe(text_batches(docs), settings["vocab_size"])
        eos = eos_id(tok, data_cfg.eos_token)
        batches = _encoded(docs, tok, eos, _threads(data_cfg.num_proc))
        held = _val_documents(len(docs), settings["val_fraction"])
        counts = _write_splits(stage.dir, batches, held, settings["val_fraction"], token_dtype(tok.get_vocab_size()))
        tok.save(str(stage.dir / "tokenizer.json"))
        stage.meta = prepared_meta(out, source=source_description(data_cfg), fingerprint=fingerprint,
                                   source_fingerprint=source_fp, tokenizer=tok, tokenizer_spec=spec, eos_id=eos,
                                   counts=counts, documents=len(docs), settings=settings)
    print(
        f"prepared {out}: {counts['train']:,} train + {counts['val']:,} val tokens "
        f"from {len(docs):,} documents, vocab {tok.get_vocab_size():,}"
    )
    return load_prepared(out)


def run_prepare(cfg: DictConfig) -> PreparedData:
    """`slm prepare`: the corpus of ``cfg.data`` prepared (or found up to date), and one line saying so."""
    prepared = prepare(cfg.data, cfg.paths)
    meta = prepared.meta
    print(f"data: {prepared.dir}  train_tokens={meta['train_tokens']} val_tokens={meta['val_tokens']} "
          f"vocab_size={meta['vocab_size']}")
    return prepared
