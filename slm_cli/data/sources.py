"""Corpus sources: the Python stdlib, local files, or a `datasets` hub name, as a one-column dataset."""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
from omegaconf import DictConfig, OmegaConf

from slm_cli.errors import SlmError
from slm_cli.text import slug

# File suffix -> `datasets` packaged builder.
SUFFIX_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SAMPLE_BY = ("document", "paragraph", "line")
# Stdlib folders that are not representative library code (or not library code at all).
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo"})
PATH_FIX = "point data.path at a .txt/.jsonl/.parquet file, a folder or a glob"
# Bytes decoded at a time when checking a file is UTF-8: the check's memory, not its speed.
UTF8_CHECK_CHUNK = 1 << 20
# Documents per batch handed to the BPE trainer.
TEXT_BATCH_DOCS = 1000


def _cfg(data_cfg: DictConfig, key: str) -> Any:
    """``data_cfg[key]``, with ``???`` (unset mandatory value) read as None."""
    return None if OmegaConf.is_missing(data_cfg, key) else data_cfg.get(key)


def _required(data_cfg: DictConfig, key: str, fix: str) -> str:
    value = _cfg(data_cfg, key)
    if not value:
        raise SlmError(f"data.{key} is not set for data.source={data_cfg.source}: {fix}")
    return str(value)


def _walk(root: Path, skip_dirs: Iterable[str] = ()) -> list[Path]:
    """Files under ``root`` sorted by relative path, pruning hidden and ``skip_dirs`` folders early."""
    skip = set(skip_dirs)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith(".")]
        found += [Path(dirpath, f) for f in filenames if not f.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _cap_files(files: list[Path], max_bytes: int | None) -> list[Path]:
    """Files in order until their total size reaches ``max_bytes`` (so later files are never read)."""
    if max_bytes is None:
        return files
    sizes = np.cumsum([f.stat().st_size for f in files])
    return files[: int(np.searchsorted(sizes, max_bytes)) + 1]


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files(max_bytes: int | None) -> list[Path]:
    files = [f for f in _walk(_stdlib_root(), STDLIB_EXCLUDED_DIRS) if f.suffix == ".py"]
    return _cap_files(files, max_bytes)


def _resolve_path(spec: str) -> list[Path]:
    """The corpus files named by data.path (a file, a folder searched recursively, or a glob)."""
    path = Path(spec).expanduser()
    if glob.has_magic(spec):
        files = sorted(Path(f) for f in glob.glob(str(path), recursive=True) if Path(f).is_file())
    elif path.is_dir():
        files = _walk(path)
    elif path.is_file():
        if path.suffix not in SUFFIX_BUILDERS:
            raise SlmError(f"data.path={spec} has unsupported suffix {path.suffix!r}: {PATH_FIX}")
        return [path]
    else:
        raise SlmError(f"data.path={spec} does not exist: {PATH_FIX}")
    files = [f for f in files if f.suffix in SUFFIX_BUILDERS]
    if not files:
        raise SlmError(f"data.path={spec} matches no .txt/.jsonl/.json/.parquet files: {PATH_FIX}")
    builders = sorted({SUFFIX_BUILDERS[f.suffix] for f in files})
    if len(builders) > 1:
        suffixes = ", ".join(sorted({f.suffix for f in files}))
        raise SlmError(
            f"data.path={spec} mixes file types ({suffixes}): point data.path at files of one type (e.g. a glob)"
        )
    return files


def _files(data_cfg: DictConfig) -> list[Path]:
    """Files read for source=stdlib/files, after the max_bytes cap."""
    if data_cfg.source == "stdlib":
        return _stdlib_files(data_cfg.max_bytes)
    return _cap_files(_resolve_path(_required(data_cfg, "path", PATH_FIX)), data_cfg.max_bytes)


def encoding_errors(data_cfg: DictConfig) -> str | None:
    """How undecodable bytes are read: always ``replace`` for the stdlib (the default corpus must
    load on every Python install), data.encoding_errors for local files, None for the hub (whose
    datasets arrive decoded)."""
    if data_cfg.source == "stdlib":
        return "replace"
    return str(data_cfg.get("encoding_errors", "strict")) if data_cfg.source == "files" else None


def first_invalid_utf8(path: Path) -> int | None:
    """The byte offset of the first byte of ``path`` that is not valid UTF-8, or None."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    consumed = 0  # bytes handed to the decoder so far
    with open(path, "rb") as f:
        while True:
            chunk = f.read(UTF8_CHECK_CHUNK)
            pending = len(decoder.getstate()[0])  # an incomplete sequence held from the last chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:  # e.start counts from the held bytes
                return consumed - pending + e.start
            if not chunk:
                return None
            consumed += len(chunk)


def _check_utf8(files: list[str]) -> None:
    """With data.encoding_errors=strict, name the first file and byte that are not UTF-8 before
    `datasets` fails on them deep inside its builder (or, for .jsonl, stores them unchecked)."""
    for file in files:
        offset = first_invalid_utf8(Path(file))
        if offset is not None:
            with open(file, "rb") as f:
                f.seek(offset)
                byte = f.read(1)
            raise SlmError(
                f"{file} is not valid UTF-8 at byte {offset} (0x{byte.hex()}): "
                "set data.encoding_errors=replace (or ignore) to read it anyway, or re-encode the file as UTF-8"
            )


def _check_source(data_cfg: DictConfig) -> None:
    # mix: several sources in one folder, built by slm_cli/data/mixture.py (data=mix)
    if data_cfg.source not in ("stdlib", "files", "hub", "mix"):
        raise SlmError(f"data.source={data_cfg.source} is unknown: use stdlib, files, hub or mix")
    if data_cfg.sample_by not in SAMPLE_BY:
        raise SlmError(f"data.sample_by={data_cfg.sample_by} is unknown: use {', '.join(SAMPLE_BY)}")



def source_name(data_cfg: DictConfig) -> str:
    """Folder name for the prepared data: data.name, else derived from the source."""
    _check_source(data_cfg)
    if _cfg(data_cfg, "name"):
        return slug(str(data_cfg.name), "corpus")
    if data_cfg.source == "stdlib":
        return "stdlib"
    if data_cfg.source == "hub":
        hub_name = _required(data_cfg, "hub_name", "set data.hub_name to a `datasets` hub name")
        base = Path(hub_name.rstrip("/")).name
        return slug(f"{base}-{data_cfg.hub_config}" if data_cfg.hub_config else base, "corpus")
    spec = _required(data_cfg, "path", PATH_FIX)
    if glob.has_magic(spec):  # "corpus/**/*.txt" -> "corpus_.txt": the folder and the pattern
        parts = Path(spec).parts
        first_magic = next(i for i, part in enumerate(parts) if glob.has_magic(part))
        return slug(" ".join(parts[max(first_magic - 1, 0) :]), "corpus")  # a run of " ", "*", "?" -> one "_"
    path = Path(spec).expanduser().resolve()
    return slug(path.stem if path.is_file() else path.name, "corpus")


def source_description(data_cfg: DictConfig) -> str:
    """Short human-readable description of the source (for meta.json and messages)."""
    if data_cfg.source == "stdlib":
        return f"stdlib of Python {sys.version.split()[0]}"
    if data_cfg.source == "hub":
        config = f" ({data_cfg.hub_config})" if data_cfg.hub_config else ""
        return f"hub {data_cfg.hub_name}{config} split {data_cfg.hub_split}"
    return f"files {data_cfg.path}"


def _file_stats(files: list[Path], root: Path | None = None) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) per file: changes when a file is edited, without reading it."""
    stats = [(f, f.stat()) for f in files]
    return [(str(f.relative_to(root) if root else f.resolve()), s.st_size, s.st_mtime_ns) for f, s in stats]


def source_fingerprint(data_cfg: DictConfig) -> str:
    """Cheap, deterministic hash of everything about the source that changes the documents."""
    _check_source(data_cfg)
    desc: dict[str, Any] = {
        key: _cfg(data_cfg, key) for key in ("source", "max_bytes", "sample_by", "text_field")
    }
    if data_cfg.source == "stdlib":
        desc["python"] = sys.version
        desc["files"] = _file_stats(_files(data_cfg), _stdlib_root())
    elif data_cfg.source == "files":
        desc["files"] = _file_stats(_files(data_cfg))
        if encoding_errors(data_cfg) != "strict":  # only then: fingerprints from before the key stay valid
            desc["encoding_errors"] = encoding_errors(data_cfg)
    else:
        hub_name = _required(data_cfg, "hub_name", "set data.hub_name to a `datasets` hub name")
        desc["hub"] = [hub_name, data_cfg.hub_config, data_cfg.hub_split]
        if Path(hub_name).is_dir():  # a local dataset folder: notice edits like for source=files
            desc["files"] = _file_stats(_walk(Path(hub_name)))
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


def _load(what: str, fix: str, *args: Any, **kwargs: Any) -> Any:
    """``datasets.load_dataset`` with its many failure modes turned into one-line SlmErrors."""
    from datasets import load_dataset  # deferred: importing datasets costs ~1 s

    try:
        return load_dataset(*args, **kwargs)
    except Exception as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise SlmError(f"could not load {what} ({type(e).__name__}: {detail}): {fix}") from None


def _text_column(ds: Any, field: str, what: str) -> Any:
    """Reduce ``ds`` to one string column named ``text``."""
    if field not in ds.column_names:
        raise SlmError(
            f"{what} has no column {field!r} (columns: {', '.join(ds.column_names)}): "
            "set data.text_field to the column holding the text"
        )
    dtype = getattr(ds.features[field], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise SlmError(f"column {field!r} of {what} is not text ({ds.features[field]}): set data.text_field")
    ds = ds.select_columns([field])
    return ds if field == "text" else ds.rename_column(field, "text")


def _cap_documents(ds: Any, max_bytes: int | None) -> Any:
    """Leading documents until their UTF-8 size reaches ``max_bytes`` (a contiguous, copy-free select)."""
    if max_bytes is None or len(ds) == 0:
        return ds
    sizes = np.cumsum(pc.binary_length(ds.with_format("arrow")["text"]).fill_null(0).to_numpy())
    return ds.select(range(min(len(ds), int(np.searchsorted(sizes, max_bytes)) + 1)))


def _drop_blank(ds: Any) -> Any:
    """Drop empty / whitespace-only documents, chunk by chunk so a huge corpus is never copied."""
    keep = [
        pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(chunk)), 0)
        .fill_null(False)
        .to_numpy(zero_copy_only=False)
        for chunk in ds.with_format("arrow")["text"].chunks
    ]
    mask = np.concatenate(keep) if keep else np.zeros(0, bool)
    return ds if mask.all() else ds.select(np.flatnonzero(mask), keep_in_memory=True)


def load_documents(data_cfg: DictConfig, cache_dir: Path) -> Any:
    """The corpus as a ``datasets.Dataset`` with one ``text`` column, one row per non-blank document."""
    _check_source(data_cfg)
    cache = str(cache_dir)
    what = source_description(data_cfg)
    if data_cfg.source == "hub":
        ds = _load(
            f"hub dataset {data_cfg.hub_name}",
            "check the name or use data=text with local files",
            data_cfg.hub_name,
            data_cfg.hub_config,
            split=data_cfg.hub_split,
            cache_dir=cache,
        )
        ds = _text_column(ds, data_cfg.text_field, what)
    else:
        files = [str(f) for f in _files(data_cfg)]
        if data_cfg.source == "stdlib":
            # Replace undecodable bytes: the default corpus must load on every Python install.
            kwargs = {"sample_by": "document", "encoding_errors": "replace"}
            builder = "text"
        else:
            builder = SUFFIX_BUILDERS[Path(files[0]).suffix]
            kwargs = {"sample_by": data_cfg.sample_by} if builder == "text" else {}
            errors = encoding_errors(data_cfg)
            if builder in ("text", "json") and errors == "strict":
                _check_utf8(files)
            elif builder in ("text", "json"):
                kwargs["encoding_errors"] = errors
                if builder == "json":
                    # The json builder hands UTF-8 bytes to pyarrow undecoded, ignoring
                    # encoding_errors; it decodes (with them) for any other spelling of the codec.
                    kwargs["encoding"] = "utf_8"
        ds = _load(
            what,
            f"check the files are valid UTF-8 {builder} files; {PATH_FIX}",
            builder,
            data_files=files,
            split="train",
            cache_dir=cache,
            **kwargs,
        )
        ds = _text_column(ds, "text" if builder == "text" else data_cfg.text_field, what)
    ds = _drop_blank(_cap_documents(ds, data_cfg.max_bytes))
    if len(ds) == 0:
        raise SlmError(
            f"corpus {what} has no text (no non-blank documents): "
            "check data.path, data.text_field and data.sample_by"
        )
    return ds


def text_batches(docs: Any, batch_size: int = TEXT_BATCH_DOCS) -> Iterator[list[str]]:
    """The documents of :func:`load_documents`' dataset as lists of strings, a batch at a time (what
    the BPE trainer reads), without holding the corpus as Python strings."""
    for batch in docs.with_format("arrow").iter(batch_size=batch_size):
        yield batch["text"].to_pylist()
