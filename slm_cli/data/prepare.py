"""Build a prepared corpus: tokenise the text once into the format of slm_cli/data/prepared.py.

The folder is committed as one (slm_cli/data/sidecar.py): every file is staged and moved into
place, ``meta.json`` last, and its input fingerprint lets a repeated ``prepare`` return at once.
:func:`prepare` is every command's entry point: one corpus here, ``data=mix`` through
slm_cli/data/mixture.py, which prepares each of its sources through :func:`prepare` again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
from omegaconf import DictConfig
from tokenizers import Tokenizer

from slm_cli.config import check_data
from slm_cli.data.mixture import prepare_mixture
from slm_cli.data.prepared import (
    FILES,
    FORMAT_VERSION,
    SPLITS,
    PreparedData,
    load_prepared,
    prepared_meta,
    token_dtype,
    try_load,
    write_tokens,
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

# Below this many documents a document-level split is too coarse; split the token stream instead.
MIN_DOCS_FOR_DOC_SPLIT = 20
# Documents per worker below which extra tokenisation processes cost more to start than they save.
DOCS_PER_PROC = 1000
BATCH_DOCS = 1000


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


def _num_proc(requested: int | None, n_docs: int) -> int:
    # Worker start-up only pays off with enough documents per worker.
    return max(1, min(requested or os.cpu_count() or 1, n_docs // DOCS_PER_PROC))


@contextlib.contextmanager
def _serial_tokenizers(num_proc: int) -> Iterator[None]:
    """With worker processes, each encodes serially: Rust threads in forked workers would deadlock
    (tokenizers disables them with a warning); with one process, Rust parallelism is kept."""
    if num_proc == 1:
        yield
        return
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _tokenise(docs: Any, tok: Tokenizer, eos: int, cache_file: Path, num_proc: int, fingerprint: str) -> Any:
    """Dataset with an ``ids`` column: each document's token ids followed by the EOS id."""
    from datasets import Features, List, Value

    # Literal "<|endoftext|>" inside a document is text, not a separator (GPT-2's encode_ordinary).
    tok.encode_special_tokens = True

    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        return {"ids": [e.ids + [eos] for e in tok.encode_batch(batch["text"], add_special_tokens=False)]}

    with _serial_tokenizers(num_proc):
        return docs.map(
            encode,
            batched=True,
            batch_size=BATCH_DOCS,
            remove_columns=["text"],
            features=Features({"ids": List(Value("uint32"))}),
            num_proc=num_proc if num_proc > 1 else None,
            cache_file_name=str(cache_file),
            new_fingerprint=fingerprint[:32],  # datasets appends a per-worker suffix; max 64 chars
            desc="tokenising",
        )


def _chunks(ids: Any) -> Iterator[np.ndarray]:
    """The concatenated token stream of a tokenised dataset, as flat arrays of a batch each."""
    for batch in ids.with_format("arrow").iter(batch_size=BATCH_DOCS * 10):
        yield pc.list_flatten(batch["ids"]).to_numpy()


def _slice_chunks(chunks: Iterator[np.ndarray], start: int, stop: int) -> Iterator[np.ndarray]:
    """Tokens [start, stop) of a chunked stream."""
    pos = 0
    for chunk in chunks:
        lo, hi = max(start - pos, 0), min(stop - pos, len(chunk))
        if lo < hi:
            yield chunk[lo:hi]
        pos += len(chunk)
        if pos >= stop:
            return


def _split(ids: Any, val_fraction: float) -> dict[str, tuple[Any, int, int]]:
    """Per split: (dataset, first token, end token) of the stream to write.

    With enough documents, whole documents go to val (seeded, so repeatable), kept in corpus order;
    otherwise the last ``val_fraction`` of the token stream is val.
    """
    lengths = pc.list_value_length(ids.with_format("arrow")["ids"]).to_numpy().astype(np.int64)
    n_docs, total = len(lengths), int(lengths.sum())
    if n_docs >= MIN_DOCS_FOR_DOC_SPLIT:
        from datasets import Dataset

        n_val = min(max(math.ceil(val_fraction * n_docs), 1), n_docs - 1)
        split = Dataset.from_dict({"i": np.arange(n_docs)}).train_test_split(test_size=n_val, seed=0)
        parts = {}
        for name, key in zip(SPLITS, ("train", "test"), strict=True):
            index = np.sort(np.asarray(split[key]["i"]))
            parts[name] = (ids.select(index, keep_in_memory=True), 0, int(lengths[index].sum()))
        return parts
    # total >= 2: every non-blank document has at least one token plus its EOS.
    n_val = min(max(round(val_fraction * total), 1), total - 1)
    return {"train": (ids, 0, total - n_val), "val": (ids, total - n_val, total)}


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
        dtype = token_dtype(tok.get_vocab_size())
        ids = _tokenise(docs, tok, eos, stage.dir / "ids.arrow", _num_proc(data_cfg.num_proc, len(docs)), fingerprint)
        counts = {}
        for split, (subset, start, stop) in _split(ids, settings["val_fraction"]).items():
            write_tokens(stage.dir / f"{split}.bin", _slice_chunks(_chunks(subset), start, stop), stop - start, dtype)
            counts[split] = stop - start
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
