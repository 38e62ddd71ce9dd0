"""Data component: sources, tokenizers, prepared token streams and training/validation windows.

References are computed independently of slm_cli (plain file reads, direct slicing).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sysconfig
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.utils.data import DataLoader

from slm_cli.data.prepare import prepare
from slm_cli.data.prepared import load_prepared, token_dtype
from slm_cli.data.sources import load_documents, source_fingerprint, source_name
from slm_cli.data.tokenizer import eos_id, load_tokenizer, tokenizer_sha256, train_bpe
from slm_cli.data.windows import StepSampler, TrainWindows, ValWindows, sample_starts
from slm_cli.errors import SlmError

# `slm_cli.data.prepare` the module (for monkeypatching), not the function of that name.
prepare_mod = importlib.import_module("slm_cli.data.prepare")

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"
VOCAB = 300


def data_cfg(**overrides: object) -> DictConfig:
    """conf/data/stdlib.yaml with overrides (what `data=... data.x=y` composes to)."""
    base = OmegaConf.load(CONF / "stdlib.yaml")
    return OmegaConf.merge(base, {"vocab_size": VOCAB, "max_bytes": 300_000, **overrides})


def files_cfg(path: Path | str, **overrides: object) -> DictConfig:
    return data_cfg(
        **{
            "source": "files",
            "name": None,
            "path": str(path),
            "max_bytes": None,
            "sample_by": "paragraph",
            **overrides,
        }
    )


@pytest.fixture
def paths(tmp_path: Path) -> DictConfig:
    return OmegaConf.create({"data_dir": str(tmp_path / "data")})


@pytest.fixture(scope="module")
def docs() -> list[str]:
    """40 distinct real-text paragraphs without blank lines inside (so `sample_by=paragraph` keeps them)."""
    paragraphs = [p.strip("\n") for p in Path(argparse.__file__).read_text().split("\n\n")]
    unique = list(dict.fromkeys(p for p in paragraphs if p.strip()))
    return unique[:40]


@pytest.fixture
def corpus(tmp_path: Path, docs: list[str]) -> Path:
    path = tmp_path / "corpus" / "corpus.txt"
    path.parent.mkdir()
    path.write_text("\n\n".join(docs))
    return path


def split_docs(stream: np.ndarray, eos: int, tok: Tokenizer) -> list[str]:
    """Decode a token stream back into its EOS-terminated documents."""
    assert stream[-1] == eos, "every document, including the last, is followed by EOS"
    cuts = np.flatnonzero(stream == eos)
    starts = np.r_[0, cuts[:-1] + 1]
    return [tok.decode(stream[a:b].tolist()) for a, b in zip(starts, cuts, strict=True)]


def decoded(data: prepare_mod.PreparedData) -> dict[str, list[str]]:
    tok = Tokenizer.from_file(str(data.tokenizer_path))
    return {split: split_docs(np.asarray(data.tokens(split)), data.eos_id, tok) for split in ("train", "val")}


def stream(data: prepare_mod.PreparedData) -> np.ndarray:
    return np.concatenate([data.tokens("train"), data.tokens("val")])


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


# --------------------------------------------------------------------------------------------- prepare


def stdlib_reference(max_bytes: int) -> list[str]:
    """The default corpus, recomputed with plain os.walk + read_text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith(".")]
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py") and not f.startswith(".")]
    files.sort(key=lambda f: f.relative_to(root).as_posix())
    texts, total = [], 0
    for f in files:
        if total >= max_bytes:
            break
        total += f.stat().st_size
        texts.append(f.read_text(errors="replace"))
    return [t for t in texts if t.strip()]


def test_stdlib_round_trip(paths: DictConfig) -> None:
    data = prepare(data_cfg(), paths)
    assert data.dir == Path(paths.data_dir) / "stdlib"
    assert data.meta["documents"] < 20  # few big files: the split is the tail of the token stream
    reference = stdlib_reference(300_000)
    tok = load_tokenizer(str(data.tokenizer_path))
    assert split_docs(stream(data), data.eos_id, tok) == reference
    assert data.meta["documents"] == len(reference)
    total = data.meta["train_tokens"] + data.meta["val_tokens"]
    assert data.meta["val_tokens"] == round(0.05 * total)
    assert data.eos_id == tok.token_to_id("<|endoftext|>")
    assert data.vocab_size == tok.get_vocab_size() == VOCAB
    assert data.dtype == np.uint16 and data.meta["dtype"] == "uint16"
    assert data.meta["tokenizer_sha256"] == tokenizer_sha256(tok)
    assert not any(p.name.startswith(".staged-") for p in data.dir.iterdir()), "temp files cleaned up"


def test_document_split_is_deterministic_and_keeps_order(
    tmp_path: Path, corpus: Path, docs: list[str]
) -> None:
    runs = [prepare(files_cfg(corpus), OmegaConf.create({"data_dir": str(tmp_path / d)})) for d in ("a", "b")]
    first = decoded(runs[0])
    assert first == decoded(runs[1])
    assert all(np.array_equal(runs[0].tokens(s), runs[1].tokens(s)) for s in ("train", "val"))
    assert len(first["val"]) == 2  # ceil(0.05 * 40) whole documents
    val = set(first["val"])
    assert first["train"] == [d for d in docs if d not in val], "train keeps corpus order, no doc lost"
    assert first["val"] == [d for d in docs if d in val]
    assert runs[0].dir.name == "corpus"


def test_no_op_then_reprepare_on_change(
    paths: DictConfig, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = files_cfg(corpus)
    data = prepare(cfg, paths)
    (data.dir / "scores.npy").write_bytes(b"later feature")  # other files must survive re-prepares
    before = mtimes(data.dir)
    with monkeypatch.context() as m:
        m.setattr(prepare_mod, "load_documents", lambda *a: pytest.fail("no-op must not load the corpus"))
        m.setattr(prepare_mod, "train_bpe", lambda *a: pytest.fail("no-op must not train"))
        start = time.perf_counter()
        again = prepare(cfg, paths)
        assert time.perf_counter() - start < 1.0
    assert again.meta == data.meta and mtimes(data.dir) == before

    corpus.write_text(corpus.read_text() + "\n\nA new closing paragraph.")
    changed = prepare(cfg, paths)
    assert changed.meta["fingerprint"] != data.meta["fingerprint"]
    assert changed.meta["documents"] == data.meta["documents"] + 1

    bigger = prepare(files_cfg(corpus, vocab_size=VOCAB + 40), paths)
    assert bigger.vocab_size == VOCAB + 40 and bigger.dir == data.dir
    assert (data.dir / "scores.npy").read_bytes() == b"later feature"


def test_file_formats_give_the_same_tokens(
    tmp_path: Path, paths: DictConfig, corpus: Path, docs: list[str]
) -> None:
    reference = stream(prepare(files_cfg(corpus), paths))
    records = [{"id": i, "body": d} for i, d in enumerate(docs)]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    parquet = tmp_path / "pq" / "c.parquet"
    parquet.parent.mkdir()
    pd.DataFrame(records).to_parquet(parquet)
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("\n\n".join(docs[:25]))
    (folder / "sub" / "b.txt").write_text("\n\n".join(docs[25:]))
    (folder / "notes.md").write_text("ignored: not a corpus suffix")
    variants = {
        "c": files_cfg(jsonl, text_field="body"),
        "c-parquet": files_cfg(parquet, text_field="body", name="c-parquet"),
        "folder": files_cfg(folder),
        "folder_.txt": files_cfg(f"{folder}/**/*.txt"),
        "pq": data_cfg(source="hub", name=None, hub_name=str(parquet.parent), text_field="body"),
    }
    for name, cfg in variants.items():
        data = prepare(cfg, paths)
        assert data.dir.name == name == source_name(cfg)
        assert np.array_equal(stream(data), reference), name


def test_literal_eos_text_is_not_a_separator(tmp_path: Path, paths: DictConfig) -> None:
    corpus = tmp_path / "eos.txt"
    corpus.write_text("a <|endoftext|> b\n\nsecond document")
    data = prepare(files_cfg(corpus), paths)
    assert np.count_nonzero(stream(data) == data.eos_id) == 2
    tok = load_tokenizer(str(data.tokenizer_path))
    assert split_docs(stream(data), data.eos_id, tok) == ["a <|endoftext|> b", "second document"]


def test_worker_threads_give_the_same_tokens(tmp_path: Path, docs: list[str]) -> None:
    corpus = tmp_path / "lines.txt"  # > 2 * BATCH_DOCS lines, so num_proc=2 really encodes in 2 threads
    corpus.write_text("\n".join(f"{i} {line}" for i in range(12) for d in docs for line in d.splitlines()))
    runs = [
        prepare(
            files_cfg(corpus, sample_by="line", num_proc=n),
            OmegaConf.create({"data_dir": str(tmp_path / str(n))}),
        )
        for n in (1, 2)
    ]
    assert runs[0].meta["documents"] >= 2 * prepare_mod.BATCH_DOCS
    assert np.array_equal(stream(runs[0]), stream(runs[1]))


def test_dtype_follows_vocab_size(tmp_path: Path, paths: DictConfig) -> None:
    assert (
        token_dtype(256) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    )
    # A word-level tokenizer with a huge vocab: ids are known, so the stream is checked exactly.
    vocab = {f"w{i}": i for i in range(70_000)} | {"<unk>": 70_000, "</s>": 70_001}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "big.json"))
    corpus = tmp_path / "words.txt"
    corpus.write_text("w1 w69999\n\nw65536 w2 w3\n")
    data = prepare(files_cfg(corpus), paths, tokenizer_spec=str(tmp_path / "big.json"))
    assert data.dtype == np.uint32 and data.vocab_size == 70_002
    assert stream(data).tolist() == [1, 69999, 70_001, 65536, 2, 3, 70_001]
    assert data.dir.name == f"words.tok-{tokenizer_sha256(tok)[:8]}"
    assert load_prepared(data.dir).meta["tokenizer"] == str(tmp_path / "big.json")


def test_foreign_tokenizer_reuses_matching_default_folder(paths: DictConfig, corpus: Path) -> None:
    cfg = files_cfg(corpus)
    data = prepare(cfg, paths)
    # `slm eval` with the tokenizer the data was prepared with: same tokens, so no new folder.
    assert prepare(cfg, paths, tokenizer_spec=str(data.dir)).dir == data.dir
    other = prepare(files_cfg(corpus, val_fraction=0.1), paths, tokenizer_spec=str(data.tokenizer_path))
    assert other.dir.name == f"corpus.tok-{data.meta['tokenizer_sha256'][:8]}"
    assert load_prepared(data.dir).meta == data.meta, "the default folder is left alone"


def test_interrupted_prepare_leaves_no_meta(
    paths: DictConfig, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = prepare(files_cfg(corpus), paths)
    real_replace = os.replace

    def crash_mid_commit(src: Path, dst: Path) -> None:
        if Path(dst).name == "tokenizer.json":  # train.bin and val.bin are already in place
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(prepare_mod.os, "replace", crash_mid_commit)
    with pytest.raises(KeyboardInterrupt):
        prepare(files_cfg(corpus, vocab_size=VOCAB + 20), paths)
    assert not (data.dir / "meta.json").exists()
    assert not any(p.name.startswith(".staged-") for p in data.dir.iterdir())
    with pytest.raises(SlmError, match="no prepared data"):
        load_prepared(data.dir)
    monkeypatch.undo()
    assert prepare(files_cfg(corpus, vocab_size=VOCAB + 20), paths).vocab_size == VOCAB + 20


def test_one_meta_writer_for_both_builds(paths: DictConfig, corpus: Path) -> None:
    """A plain folder's meta.json holds exactly META_KEYS, and a mixture's adds only `mixture`: both
    come from prepared_meta, which load_prepared's checks read."""
    from slm_cli.data.prepared import META_KEYS, MIXTURE_KEY, prepared_meta

    data = prepare(files_cfg(corpus), paths)
    assert list(json.loads((data.dir / "meta.json").read_text())) == list(META_KEYS)
    tok = load_tokenizer(str(data.tokenizer_path))
    fields = {"source": "s", "fingerprint": "f", "source_fingerprint": "g", "tokenizer": tok, "tokenizer_spec": "bpe",
              "eos_id": data.eos_id, "counts": {"train": 3, "val": 1}, "documents": 2, "settings": {}}
    mixture = [{"name": "a", "train": [0, 3], "val": [0, 1]}]
    assert list(prepared_meta(data.dir, **fields, mixture=mixture)) == [*META_KEYS, MIXTURE_KEY]
    assert prepared_meta(data.dir, **fields)["dtype"] == token_dtype(tok.get_vocab_size()).name


def test_load_prepared_validates(tmp_path: Path, paths: DictConfig, corpus: Path) -> None:
    with pytest.raises(SlmError, match=r"no prepared data at .*: run `slm prepare"):
        load_prepared(tmp_path / "nothing")
    data = prepare(files_cfg(corpus), paths)
    meta_path = data.dir / "meta.json"
    good = meta_path.read_text()

    meta_path.write_text("{not json")
    with pytest.raises(SlmError, match="corrupt meta.json .*delete it and re-run"):
        load_prepared(data.dir)
    meta_path.write_text(json.dumps({k: v for k, v in data.meta.items() if k != "eos_id"}))
    with pytest.raises(SlmError, match="corrupt meta.json .*eos_id"):
        load_prepared(data.dir)
    for bad in ("[]", json.dumps(data.meta | {"train_tokens": None})):
        meta_path.write_text(bad)
        with pytest.raises(SlmError, match="corrupt meta.json"):
            load_prepared(data.dir)
    meta_path.write_text(json.dumps(data.meta | {"dtype": "uint32"}))
    with pytest.raises(SlmError, match="dtype uint32"):
        load_prepared(data.dir)
    meta_path.write_text(good)
    with open(data.dir / "val.bin", "r+b") as f:
        f.truncate(4)
    with pytest.raises(SlmError, match="val.bin has 4 bytes"):
        load_prepared(data.dir)
    # prepare reports the damage rather than silently rebuilding; the fix it names repairs it.
    with pytest.raises(SlmError, match="delete meta.json and re-run"):
        prepare(files_cfg(corpus), paths)
    meta_path.unlink()
    assert prepare(files_cfg(corpus), paths).meta["val_tokens"] == data.meta["val_tokens"], "repaired"


# ------------------------------------------------------------------------------------------- sources


def test_source_names_and_fingerprints(tmp_path: Path, corpus: Path) -> None:
    assert source_name(data_cfg()) == "stdlib"
    assert source_name(data_cfg(name="my corpus")) == "my_corpus"
    assert source_name(files_cfg(corpus)) == "corpus"
    assert source_name(files_cfg(corpus.parent)) == "corpus"
    assert source_name(files_cfg(tmp_path / "x" / "*.jsonl")) == "x_.jsonl"
    hub = data_cfg(source="hub", name=None, hub_name="Salesforce/wikitext", hub_config="wikitext-2-raw-v1")
    assert source_name(hub) == "wikitext-wikitext-2-raw-v1"

    fp = source_fingerprint(files_cfg(corpus))
    assert fp == source_fingerprint(files_cfg(corpus))
    assert fp != source_fingerprint(files_cfg(corpus, text_field="body"))
    assert fp != source_fingerprint(files_cfg(corpus, max_bytes=100))
    assert source_fingerprint(data_cfg()) != source_fingerprint(data_cfg(max_bytes=200_000))
    corpus.write_text(corpus.read_text() + "more")
    assert fp != source_fingerprint(files_cfg(corpus))


def test_max_bytes_caps_documents(tmp_path: Path, corpus: Path, docs: list[str]) -> None:
    size = len(docs[0].encode()) + len(docs[1].encode())
    loaded = load_documents(files_cfg(corpus, max_bytes=size), tmp_path / "cache")
    assert loaded["text"][:] == docs[:2]


@pytest.mark.parametrize(
    ("setup", "overrides", "message"),
    [
        (lambda d: d / "missing.txt", {}, r"data.path=.*missing.txt does not exist: point data.path at"),
        (lambda d: d / "*.nothing", {}, "matches no .txt/.jsonl/.json/.parquet files"),
        (lambda d: d / "doc.md", {}, "unsupported suffix '.md'"),
        (lambda d: d, {}, r"mixes file types \(.jsonl, .txt\)"),
        (lambda d: d / "blank.txt", {}, "has no text"),
        (lambda d: d / "a.jsonl", {"text_field": "content"}, r"no column 'content' \(columns: body\)"),
        (lambda d: d / "a.jsonl", {"val_fraction": 1.0}, "data.val_fraction=1.0"),
    ],
)
def test_source_errors(tmp_path: Path, paths: DictConfig, setup, overrides: dict, message: str) -> None:
    (tmp_path / "a.jsonl").write_text('{"body": "some text"}\n')
    (tmp_path / "b.txt").write_text("more text")
    (tmp_path / "blank.txt").write_text("\n\n   \n\n\t\n")
    (tmp_path / "doc.md").write_text("markdown")
    cfg = files_cfg(setup(tmp_path), **overrides)
    with pytest.raises(SlmError, match=message) as err:
        prepare(cfg, paths)
    assert "\n" not in str(err.value)


def test_hub_errors(paths: DictConfig) -> None:
    with pytest.raises(SlmError, match="could not load hub dataset /nonexistent/ds .*use data=text"):
        prepare(data_cfg(source="hub", hub_name="/nonexistent/ds"), paths)
    with pytest.raises(SlmError, match="data.hub_name is not set"):
        prepare(data_cfg(source="hub", name=None), paths)


def test_text_yaml_requires_path(paths: DictConfig) -> None:
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "stdlib.yaml"), OmegaConf.load(CONF / "text.yaml"))
    with pytest.raises(SlmError, match="data.path is not set"):
        prepare(cfg, paths)


# ----------------------------------------------------------------------------------------- tokenizer


def test_train_bpe_is_deterministic_and_byte_complete(docs: list[str]) -> None:
    first, second = (train_bpe(iter([docs[:20], docs[20:]]), VOCAB) for _ in range(2))
    assert first.to_str() == second.to_str()
    text = "naïve 東京 \x00\t emoji 🙂 <|endoftext|>"
    assert first.token_to_id("<unk>") is None
    assert first.decode(first.encode(text).ids, skip_special_tokens=False) == text
    with pytest.raises(SlmError, match="vocab_size=100 is too small"):
        train_bpe(iter([docs]), 100)


def test_load_tokenizer_from_every_kind_of_spec(tmp_path: Path, docs: list[str]) -> None:
    tok = train_bpe(iter([docs]), VOCAB)
    tok.save(str(tmp_path / "tokenizer.json"))
    torch.save({"slm": {"tokenizer_json": tok.to_str()}, "state_dict": {}}, tmp_path / "model.ckpt")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (tmp_path / "model.ckpt").rename(run_dir / "checkpoints" / "last.ckpt")
    specs = [
        str(tmp_path / "tokenizer.json"),
        str(tmp_path),
        str(run_dir),
        str(run_dir / "checkpoints" / "last.ckpt"),
    ]
    sample = docs[3] + " <|endoftext|> ünïcode"
    for spec in specs:
        loaded = load_tokenizer(spec)
        assert tokenizer_sha256(loaded) == tokenizer_sha256(tok), spec
        assert loaded.encode(sample).ids == tok.encode(sample).ids, spec

    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    for bad in ("broken.ckpt", "foreign.ckpt"):
        with pytest.raises(SlmError, match="cannot read a tokenizer from checkpoint"):
            load_tokenizer(str(tmp_path / bad))
    with pytest.raises(SlmError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing" / "tokenizer.json"))
    with pytest.raises(SlmError, match="has no tokenizer.json nor checkpoints"):
        load_tokenizer(str(tmp_path / "run" / "checkpoints"))


def test_eos_id() -> None:
    tok = Tokenizer(models.WordLevel({"a": 0, "</s>": 1, "<eos>": 2, "<sep>": 3}, unk_token="a"))
    assert eos_id(tok, None) == 1
    assert eos_id(tok, "<sep>") == 3
    with pytest.raises(SlmError, match="data.eos_token='<x>' is not in the tokenizer vocabulary"):
        eos_id(tok, "<x>")
    with pytest.raises(SlmError, match="set data.eos_token"):
        eos_id(Tokenizer(models.WordLevel({"a": 0}, unk_token="a")), None)


# ------------------------------------------------------------------------------------------- windows


@pytest.fixture
def tokens(tmp_path: Path) -> np.memmap:
    values = np.random.default_rng(0).integers(0, 60_000, size=5_000, dtype=np.uint16)
    values.tofile(tmp_path / "t.bin")
    return np.memmap(tmp_path / "t.bin", dtype=np.uint16, mode="r")


def test_sample_starts() -> None:
    idx = np.arange(200_000)
    starts = sample_starts(7, idx, 1_000, 100)
    assert starts.dtype == np.int64 and starts.min() >= 0 and starts.max() < 900
    assert np.array_equal(starts, sample_starts(7, idx, 1_000, 100))
    assert np.array_equal(starts[1234:1300], sample_starts(7, idx[1234:1300], 1_000, 100)), "stateless"
    assert np.mean(starts == sample_starts(8, idx, 1_000, 100)) < 0.01, "seed changes the windows"
    counts = np.bincount(starts, minlength=900)
    assert counts.min() > 0.7 * counts.mean() and counts.max() < 1.3 * counts.mean()
    assert sample_starts(-1, np.array([0, 1]), 101, 100).tolist() == [0, 0]
    with pytest.raises(SlmError, match=r"100 tokens, fewer than model.block_size \+ 1 = 101"):
        sample_starts(0, idx, 100, 100)


def test_train_windows(tokens: np.memmap) -> None:
    scores = np.random.default_rng(1).random(len(tokens), dtype=np.float32)
    ds = TrainWindows(tokens, block_size=32, seed=3, token_arrays={"score": scores})
    indices = np.array([5, 0, 99, 123_456], dtype=np.int64)
    batch = ds[indices]
    starts = sample_starts(3, indices, len(tokens), 32)
    for row, s in enumerate(starts):
        assert batch["input_ids"][row].tolist() == tokens[s : s + 32].tolist()
        assert batch["labels"][row].tolist() == tokens[s + 1 : s + 33].tolist()
        assert batch["positions"][row].tolist() == list(range(s + 1, s + 33))
        assert np.array_equal(batch["score"][row].numpy(), scores[s + 1 : s + 33])
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["positions"].dtype == torch.int64
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    with pytest.raises(SlmError, match="per-token array 'score'"):
        TrainWindows(tokens, 32, 0, token_arrays={"score": scores[:-1]})

    loader = DataLoader(ds, sampler=StepSampler(rows_per_step=4, start_step=2), batch_size=None)
    step2 = next(iter(loader))
    assert step2["input_ids"].shape == (4, 32)
    assert torch.equal(step2["input_ids"], ds[np.arange(8, 12)]["input_ids"])


def test_step_sampler_is_world_size_independent() -> None:
    single = iter(StepSampler(rows_per_step=6, start_step=3))
    ranks = [iter(StepSampler(rows_per_step=3, start_step=3, rank=r, world_size=2)) for r in range(2)]
    for step in range(3, 8):
        full = next(single)
        assert full.dtype == np.int64 and full.tolist() == list(range(6 * step, 6 * step + 6))
        assert np.concatenate([next(r) for r in ranks]).tolist() == full.tolist()
    with pytest.raises(ValueError):
        StepSampler(4, rank=2, world_size=2)


def test_val_windows(tokens: np.memmap) -> None:
    ds = ValWindows(tokens, block_size=64)
    n = (len(tokens) - 1) // 64
    assert len(ds) == n
    items = [ds[k] for k in range(n)]
    assert torch.cat([it["input_ids"] for it in items]).tolist() == tokens[: n * 64].tolist()
    assert torch.cat([it["labels"] for it in items]).tolist() == tokens[1 : n * 64 + 1].tolist()
    assert torch.cat([it["positions"] for it in items]).tolist() == list(range(1, n * 64 + 1))
    batch = next(iter(DataLoader(ds, batch_size=5)))
    assert batch["input_ids"].shape == (5, 64)
    assert len(ValWindows(tokens, 64, max_windows=3)) == 3
    with pytest.raises(IndexError):
        ds[n]
    with pytest.raises(SlmError, match="the val split has 64 tokens"):
        ValWindows(tokens[:64], block_size=64)
