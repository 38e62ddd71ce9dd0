"""Data mixtures (`data=mix`): several sources with weights, one tokenizer, one prepared folder.

Each source names a data config (``conf/data/<data>.yaml``, composed here with its own
``defaults``) and may override any of its keys; ``weight`` is its share of the training windows.
Every source is prepared as usual (its own ``<name>.tok-<sha8>`` folder, so `slm eval data=<source>`
finds the very same tokens), all with ONE tokenizer: ``data.tokenizer`` of the mixture, where
``bpe`` trains one byte-level BPE on the union of the sources' documents. The mixture's folder then
holds the concatenation of the sources' train streams and of their val streams; its ``meta.json``
records each source's token span ``[start, end)`` per split and its weight, under ``mixture``.

So everything that reads ``train.bin`` (`slm score`, `slm ngram`, per-token arrays) works on a
mixture unchanged, and training draws each window from one source's span (windows.mixture_starts).
The weights are not part of the fingerprint: changing them rewrites ``meta.json``'s weights and
keeps the tokens and anything computed over them (reference scores, n-gram tables).

The sources are prepared by the function handed in as ``prepare_source`` (slm_cli/data/prepare.py's
``prepare``, which dispatches ``data=mix`` here), so that the data build has no import circle.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from slm_cli.data.prepared import (
    FILES,
    FORMAT_VERSION,
    MIXTURE_KEY,
    SPLITS,
    PreparedData,
    TokenWriter,
    load_prepared,
    prepared_meta,
    try_load,
)
from slm_cli.data.sidecar import META, commit, exclusive, staged
from slm_cli.data.sources import load_documents, source_fingerprint, source_name, text_batches
from slm_cli.data.tokenizer import load_tokenizer, tokenizer_sha256, train_bpe
from slm_cli.errors import SlmError

MIX = "mix"
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# Keys of a source entry that are not data-config keys (in the list form, `name` is the source's name;
# in the mapping form the key is, and `name` overrides the data config's folder name).
ENTRY_KEYS = ("data", "weight")
# Keys the mixture decides for every source: one tokenizer, one separator, one worker count.
SHARED_KEYS = ("tokenizer", "vocab_size", "eos_token", "num_proc")
FIX = "e.g. data.sources.wiki.weight=0.7 (see docs/data.md, Mixtures)"
# prepare.prepare: (data_cfg, paths_cfg, tokenizer_spec=...) -> the source's prepared folder
PrepareSource = Callable[..., PreparedData]


@dataclass
class Source:
    name: str  # the source's name in metrics (val/<name>/loss) and meta.json
    data: str  # the conf/data file it starts from
    weight: float
    cfg: DictConfig  # its data config, overrides applied


def data_configs() -> list[str]:
    """The names of the shipped data configs (conf/data/*.yaml)."""
    return sorted(p.name[: -len(".yaml")] for p in _conf_root().iterdir() if p.name.endswith(".yaml"))


def _conf_root() -> Any:
    return files("slm_cli.conf") / "data"


def load_data_config(name: str, key: str = "data") -> DictConfig:
    """conf/data/<name>.yaml composed as Hydra composes it: its ``defaults`` first, then itself."""
    names = data_configs()
    if name not in names:
        raise SlmError(f"{key}={name}: the data config conf/data/{name}.yaml does not exist: use one of "
                       f"{', '.join(n for n in names if n != MIX)}")
    cfg = OmegaConf.load(str(_conf_root() / f"{name}.yaml"))
    defaults = list(cfg.pop("defaults", []))
    merged = OmegaConf.create()
    if "_self_" not in defaults:
        defaults.append("_self_")  # Hydra >= 1.1: a config's own keys come after its defaults
    for entry in defaults:
        merged = OmegaConf.merge(merged, cfg if entry == "_self_" else load_data_config(str(entry)))
    return merged


def _entries(data_cfg: DictConfig) -> list[tuple[str, Any]]:
    """(name, entry) per source of ``data.sources``: a mapping name -> entry, or a list of entries with ``name``."""
    sources = data_cfg.get("sources")
    if isinstance(sources, DictConfig):
        return [(str(k), v) for k, v in sources.items()]
    if isinstance(sources, ListConfig):
        out = []
        for i, entry in enumerate(sources):
            if not isinstance(entry, DictConfig) or not entry.get("name"):
                raise SlmError(f"data.sources[{i}] has no name: give each source {{name: ..., data: ..., weight: ...}}")
            out.append((str(entry.name), entry))
        return out
    raise SlmError(f"data.sources must map source names to {{data: <conf/data name>, weight: <number>}}, "
                   f"not {sources!r}: {FIX}")


def sources(data_cfg: DictConfig) -> list[Source]:
    """The mixture's sources, checked: names, data configs, positive weights, no nested mixture."""
    entries = _entries(data_cfg)
    if not entries:
        raise SlmError(f"data.sources is empty: a mixture needs at least one source, {FIX}")
    found, seen = [], set()
    for name, entry in entries:
        where = f"data.sources.{name}"
        if not NAME.match(name) or name in seen:
            raise SlmError(f"{where}: source names must be unique and made of letters, digits, '_', '.', '-'")
        seen.add(name)
        if not isinstance(entry, DictConfig):
            raise SlmError(f"{where}={entry!r} must be a mapping {{data: <conf/data name>, weight: <number>}}: {FIX}")
        data = str(entry.get("data") or name)
        if data == MIX:
            raise SlmError(f"{where}.data=mix: a mixture cannot contain a mixture; list its sources instead")
        weight = entry.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise SlmError(f"{where}.weight={weight} must be a positive number: {FIX}")
        cfg = load_data_config(data, f"{where}.data")
        skip = (*ENTRY_KEYS, "name") if isinstance(data_cfg.sources, ListConfig) else ENTRY_KEYS
        overrides = {k: v for k, v in OmegaConf.to_container(entry, resolve=False).items() if k not in skip}
        unknown = sorted(set(overrides) - set(cfg))
        if unknown:
            raise SlmError(f"{where} sets {', '.join(unknown)}, which data={data} does not have: "
                           f"use keys of conf/data/{data}.yaml")
        cfg = OmegaConf.merge(cfg, overrides)
        if cfg.get("max_bytes") is None:
            cfg.max_bytes = data_cfg.get("max_bytes")  # the mixture's cap is every source's default
        for key in SHARED_KEYS:
            cfg[key] = data_cfg.get(key)
        found.append(Source(name, data, float(weight), cfg))
    folders: dict[str, str] = {}
    for s in found:  # each source is prepared into its own folder, which another must not overwrite
        other = folders.setdefault(source_name(s.cfg), s.name)
        if other != s.name:
            raise SlmError(f"sources {other} and {s.name} would both be prepared into {source_name(s.cfg)}/: "
                           f"give one its own folder, e.g. +data.sources.{s.name}.name={source_name(s.cfg)}-{s.name}")
    return found


def _sources_fingerprint(srcs: list[Source]) -> str:
    """What determines the sources' tokens besides the tokenizer (per-source folders add their own checks)."""
    parts = [[s.name, source_name(s.cfg), source_fingerprint(s.cfg), s.cfg.eos_token, float(s.cfg.val_fraction)]
             for s in srcs]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _with_weights(prepared: PreparedData, srcs: list[Source]) -> PreparedData:
    """The folder with this config's weights: they do not change the tokens, so they are refreshed in
    meta.json (a commit under the folder's lock) rather than rebuilding."""
    weights = {s.name: s.weight for s in srcs}
    mixture = [{**m, "weight": weights[m["name"]]} for m in prepared.meta[MIXTURE_KEY]]
    if mixture == prepared.meta[MIXTURE_KEY]:
        return prepared
    with exclusive(prepared.dir):
        return PreparedData(prepared.dir, commit(prepared.dir, {**load_prepared(prepared.dir).meta, MIXTURE_KEY: mixture}))


def prepare_mixture(data_cfg: DictConfig, paths_cfg: DictConfig, prepare_source: PrepareSource, *,
                    tokenizer_spec: str | None = None) -> PreparedData:
    """Prepare every source with one tokenizer (through ``prepare_source``) and concatenate them into
    ``{data_dir}/{data.name}/`` (``.tok-<sha8>`` with a tokenizer that was not trained here, as
    prepare.prepare)."""
    srcs = sources(data_cfg)
    spec = str(tokenizer_spec or data_cfg.tokenizer)
    out = Path(paths_cfg.data_dir) / source_name(data_cfg)
    clash = [s.name for s in srcs if source_name(s.cfg) == out.name]
    if clash:
        raise SlmError(f"source {clash[0]} would be prepared into the mixture's own folder {out.name}: "
                       f"set data.name to another name than its sources'")
    sources_fp = _sources_fingerprint(srcs)
    tok = None
    if spec == "bpe":
        identity = f"bpe:{int(data_cfg.vocab_size)}"
    else:
        tok = load_tokenizer(spec)
        identity = tokenizer_sha256(tok)
        base = try_load(out)  # the plain folder already holds these tokens (e.g. slm eval of a model trained here)
        if base and base.meta.get(MIXTURE_KEY) and (base.meta["tokenizer_sha256"], base.meta["source_fingerprint"]) \
                == (identity, sources_fp):
            return _with_weights(base, srcs)
        out = out.with_name(f"{out.name}.tok-{identity[:8]}")
    fingerprint = hashlib.sha256(json.dumps([FORMAT_VERSION, MIX, sources_fp, identity]).encode()).hexdigest()
    with exclusive(out):
        existing = load_prepared(out) if (out / META).exists() else None
        if existing and existing.meta["fingerprint"] == fingerprint:
            return _with_weights(existing, srcs)
        return _build(data_cfg, paths_cfg, prepare_source, srcs, out, tok, spec, fingerprint, sources_fp)


def _union_bpe(srcs: list[Source], cache_dir: Path, vocab_size: int) -> Any:
    """One BPE trained on every source's documents, in source order."""
    def batches() -> Iterator[list[str]]:
        for s in srcs:
            yield from text_batches(load_documents(s.cfg, cache_dir))

    return train_bpe(batches(), vocab_size)


def _build(data_cfg: DictConfig, paths_cfg: DictConfig, prepare_source: PrepareSource, srcs: list[Source],
           out: Path, tok: Any, spec: str, fingerprint: str, sources_fp: str) -> PreparedData:
    with staged(out, FILES) as stage:
        if tok is None:
            tok = _union_bpe(srcs, out.parent / ".hf_cache", int(data_cfg.vocab_size))
        tok.save(str(stage.dir / "tokenizer.json"))
        # Each source is an ordinary prepared folder with this tokenizer (bpe: the file just trained).
        source_spec = str(stage.dir / "tokenizer.json") if spec == "bpe" else spec
        parts = [prepare_source(s.cfg, paths_cfg, tokenizer_spec=source_spec) for s in srcs]
        sha = tokenizer_sha256(tok)
        for s, part in zip(srcs, parts, strict=True):
            if part.meta["tokenizer_sha256"] != sha or part.eos_id != parts[0].eos_id:
                raise SlmError(f"source {s.name} ({part.dir}) was not prepared with the mixture's tokenizer: "
                               f"delete {part.dir} and prepare again")
        mixture: list[dict[str, Any]] = [
            {"name": s.name, "data": s.data, "weight": s.weight, "dir": str(p.dir)} for s, p in zip(srcs, parts, strict=True)
        ]
        counts = {}
        for split in SPLITS:
            streams = [p.tokens(split) for p in parts]
            ends = np.cumsum([len(t) for t in streams]).tolist()
            with TokenWriter(stage.dir / f"{split}.bin", parts[0].dtype) as writer:
                for stream in streams:
                    writer.write(stream)
            for m, start, end in zip(mixture, [0, *ends[:-1]], ends, strict=True):
                m[split] = [int(start), int(end)]
            counts[split] = int(ends[-1])
        stage.meta = prepared_meta(
            out, source="mixture of " + ", ".join(f"{s.name} (data={s.data}, weight {s.weight:g})" for s in srcs),
            fingerprint=fingerprint, source_fingerprint=sources_fp, tokenizer=tok, tokenizer_spec=spec,
            eos_id=parts[0].eos_id, counts=counts, documents=sum(int(p.meta["documents"]) for p in parts),
            settings={"sources": {s.name: p.meta["settings"] for s, p in zip(srcs, parts, strict=True)}},
            mixture=mixture)
    print(f"prepared mixture {out}: {counts['train']:,} train + {counts['val']:,} val tokens from "
          + ", ".join(f"{m['name']} {m['train'][1] - m['train'][0]:,}" for m in mixture))
    return load_prepared(out)
