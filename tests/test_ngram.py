"""`slm ngram`: the top-r n-gram arrays against brute-force counts at every position, chunking,
CoCoNTs consistency, determinism, atomic output, the folder checks of `load_ngram`, and the CLI."""

from __future__ import annotations

import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from slm_cli.data.prepared import PreparedData, load_prepared
from slm_cli.errors import SlmError
from slm_cli.ngram import build as ngram_build
from slm_cli.ngram.build import build_ngram, load_ngram, ngram_dir, write_ngram
from tests.helpers import TINY_DATA, ok, slm
from tests.test_errors import fails


# ---- brute force ------------------------------------------------------------------------------
def next_counts(tokens: np.ndarray, n: int) -> dict[tuple[int, ...], Counter]:
    """context (n−1 ids) -> Counter of the next id, over every complete n-gram of the stream."""
    grams = Counter(tuple(int(x) for x in tokens[i - n + 1 : i + 1]) for i in range(n - 1, len(tokens)))
    by_context: dict[tuple[int, ...], Counter] = defaultdict(Counter)
    for gram, count in grams.items():
        by_context[gram[:-1]][gram[-1]] = count
    return by_context


def brute_force(tokens: np.ndarray, n: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, float64 probs) per position: the r most frequent next ids of the position's context,
    ties by smaller id, probability count / context count, zero-padded; zero rows for i < n−1."""
    by_context = next_counts(tokens, n)
    ids, probs = np.zeros((len(tokens), r), np.int64), np.zeros((len(tokens), r))
    for i in range(n - 1, len(tokens)):
        counts = by_context[tuple(int(x) for x in tokens[i - n + 1 : i])]
        total = sum(counts.values())
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:r]
        ids[i, : len(top)] = [v for v, _ in top]
        probs[i, : len(top)] = [c / total for _, c in top]
    return ids, probs


def random_tokens(size: int, vocab: int, seed: int = 0) -> np.ndarray:
    """Random ids from a small vocabulary, skewed so that counts differ and still often tie."""
    rng = np.random.default_rng(seed)
    return rng.choice(vocab, size=size, p=np.arange(vocab, 0, -1) / (vocab * (vocab + 1) / 2)).astype(np.uint16)


def fake_prepared(folder: Path, tokens: np.ndarray, vocab: int, fingerprint: str = "a" * 64) -> PreparedData:
    """A PreparedData whose train.bin holds `tokens` (only what the n-gram build reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens.tofile(folder / "train.bin")
    meta = {"dtype": tokens.dtype.name, "train_tokens": len(tokens), "vocab_size": vocab,
            "fingerprint": fingerprint, "tokenizer_sha256": "b" * 64}
    return PreparedData(folder, meta)


# ---- the arrays ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("r", [1, 3, 6])
def test_rows_match_brute_force_counts(n: int, r: int) -> None:
    tokens = random_tokens(3000, vocab=6, seed=n * 10 + r)
    ids, probs, stats = build_ngram(tokens, 6, n, r, dtype="float32")
    want_ids, want_probs = brute_force(tokens, n, r)
    assert ids.dtype == np.uint16 and probs.dtype == np.float32 and ids.shape == probs.shape == (3000, r)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(probs, want_probs.astype(np.float32))  # count / total, rounded once
    assert not probs[: n - 1].any() and not ids[: n - 1].any()  # incomplete contexts
    by_context = next_counts(tokens, n)
    assert stats == {"contexts": len(by_context), "ngrams": sum(map(len, by_context.values()))}


def test_tie_break_and_padding_by_hand() -> None:
    # After 3 come 1, 0, 1, 0, 2: ids 0 and 1 tie (2 each) so 0 comes first; 2 is third.
    tokens = np.array([3, 1, 3, 0, 3, 1, 3, 0, 3, 2], np.uint16)
    ids, probs, _ = build_ngram(tokens, 4, 2, 4, dtype="float32")
    assert ids[1].tolist() == [0, 1, 2, 0] and probs[1].tolist() == pytest.approx([0.4, 0.4, 0.2, 0])
    assert ids[2].tolist() == [3, 0, 0, 0] and probs[2].tolist() == [1, 0, 0, 0]  # after 1: always 3
    assert ids[0].tolist() == [0] * 4 and probs[0].tolist() == [0] * 4  # no context


def test_large_vocabulary_uses_uint32_ids() -> None:
    rng = np.random.default_rng(1)
    tokens = (70_000 - 1 - rng.integers(0, 5, 2000)).astype(np.uint32)  # ids near the top of the vocabulary
    ids, probs, _ = build_ngram(tokens, 70_000, 3, 2, chunk_tokens=333, dtype="float32")
    want_ids, want_probs = brute_force(tokens, 3, 2)
    assert ids.dtype == np.uint32
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(probs, want_probs.astype(np.float32))


@pytest.mark.parametrize("n", [2, 4])
def test_chunks_and_shards_give_identical_arrays(n: int) -> None:
    tokens = random_tokens(2000, vocab=5, seed=7)
    whole = build_ngram(tokens, 5, n, 3)
    # chunk 1: one run per position, each merged ~log(chunks) times; shards: one pass per shard.
    for chunk, shards in ((1, 1), (7, 1), (500, 1), (2000, 3), (300, 7)):
        ids, probs, stats = build_ngram(tokens, 5, n, 3, chunk_tokens=chunk, shards=shards)
        assert ids.tobytes() == whole[0].tobytes() and probs.tobytes() == whole[1].tobytes()
        assert stats == whole[2]


def test_both_top_r_sorts_agree() -> None:
    """The packed-key sort and the lexsort fallback (keys too wide to pack) order alike."""
    rng = np.random.default_rng(2)
    group = np.sort(rng.integers(0, 50, 1000))
    nxt = rng.integers(0, 30, 1000).astype(np.uint64)
    order = np.lexsort((nxt, group))
    group, nxt = group[order], nxt[order]
    counts = rng.integers(1, 6, 1000).astype(np.uint32)
    packed = ngram_build._sort_within_contexts(group, counts, nxt, bits=5)
    fallback = ngram_build._sort_within_contexts(group, counts, nxt, bits=60)  # 6 + 3 + 60 > 64 bits
    expected = sorted(zip(group.tolist(), (-counts.astype(int)).tolist(), nxt.tolist(), strict=True))
    for got in (packed, fallback):
        assert list(zip(got[0].tolist(), (-got[1].astype(int)).tolist(), got[2].tolist(), strict=True)) == expected


@pytest.mark.parametrize(("dtype", "rtol"), [("float32", 2**-24), ("float16", 2**-11)])
def test_coconts_target_is_consistent(dtype: str, rtol: float) -> None:
    """y^CC_j = y^all_j on top-r(c_j) + 1[x_j ∉ top-r(c_j)]·e_{x_j}: its mean over the positions
    sharing a context c is y^all(c) (up to the rounding of the stored probabilities), and its
    variance around y^all(c) is at most the one-hot target's."""
    vocab, n, r = 6, 3, 2
    tokens = random_tokens(4000, vocab=vocab, seed=3)
    ids, probs, _ = build_ngram(tokens, vocab, n, r, dtype=dtype)
    sums, sq_cc, sq_onehot, positions = defaultdict(lambda: np.zeros(vocab)), Counter(), Counter(), Counter()
    y_all = {c: np.array([cnt[v] for v in range(vocab)]) / sum(cnt.values()) for c, cnt in next_counts(tokens, n).items()}
    for j in range(n - 1, len(tokens)):
        c, x = tuple(int(t) for t in tokens[j - n + 1 : j]), int(tokens[j])
        real = probs[j] > 0  # padding slots hold id 0 with probability 0
        y_cc = np.zeros(vocab)
        y_cc[ids[j][real]] = probs[j][real].astype(np.float64)
        if x not in ids[j][real]:
            y_cc[x] += 1.0
        sums[c] += y_cc
        sq_cc[c] += float(((y_cc - y_all[c]) ** 2).sum())
        sq_onehot[c] += float(((np.eye(vocab)[x] - y_all[c]) ** 2).sum())
        positions[c] += 1
    assert any((y > 0).sum() > r for y in y_all.values())  # contexts with mass outside their top r
    for c, total in sums.items():
        np.testing.assert_allclose(total / positions[c], y_all[c], rtol=rtol, atol=0)
        assert sq_cc[c] <= sq_onehot[c] + 1e-9


def test_float16_keeps_tiny_probabilities_positive() -> None:
    """An entry is real iff its probability is > 0; float16 would round p < 3e-8 to 0."""
    bits = 2  # context 1 followed by id 1 10^8 times and by id 2 once: p(2 | 1) = 1e-8
    keys = np.array([(1 << bits) | 1, (1 << bits) | 2], np.uint64)
    counts = np.array([10**8, 1], np.uint32)
    contexts, ids, probs = ngram_build.top_r_table(keys, counts, bits, 3, np.dtype(np.uint16), np.dtype(np.float16))
    assert contexts.tolist() == [1] and ids.tolist() == [[1, 2, 0]]
    assert probs[0, 0] == 1 and probs[0, 1] == np.finfo(np.float16).smallest_subnormal and probs[0, 2] == 0


def test_float16_arrays_train_the_float32_target() -> None:
    """CoCoNTs from float16 arrays (the default) against float32 ones on the same windows: the same
    ids and label slots, each probability within float16's rounding (2^-11 relative, 2^-25 absolute
    below 6e-5), and the loss within the bound that rounding implies (sum of |dy| |log p|, float64),
    its gradients within float16 tolerance."""
    import torch

    from slm_cli.data.windows import TrainWindows
    from slm_cli.loss import token_stats, weighted_loss
    from slm_cli.target.coconts import CoCoNTs

    vocab, n, r = 20, 3, 4
    tokens = random_tokens(4000, vocab=vocab, seed=5)
    target = CoCoNTs(n=n, r=r, weight=0.5)
    results = {}
    for dtype in ("float32", "float16"):
        ids, probs, _ = build_ngram(tokens, vocab, n, r, dtype=dtype)
        assert probs.dtype == np.dtype(dtype)
        windows = TrainWindows(tokens, 16, seed=1, token_arrays={"ngram_ids": ids, "ngram_probs": probs})
        batch = windows[np.arange(8)]
        targets = target.targets(batch)
        labels = batch["labels"].reshape(-1)
        torch.manual_seed(0)
        hidden = torch.randn(labels.numel(), 8, requires_grad=True)
        weight = torch.randn(vocab, 8, requires_grad=True)
        weights = torch.full((labels.numel(),), 1 / labels.numel())
        stats = token_stats(hidden.detach(), weight.detach(), labels, chunk_size=7)
        loss = weighted_loss(hidden, weight, labels, weights, stats, targets=targets, chunk_size=7)
        loss.backward()
        log_p = torch.log_softmax(hidden.detach().double() @ weight.detach().double().T, -1)
        results[dtype] = (targets, loss.item(), hidden.grad, weight.grad, log_p)
    (t32, loss32, gh32, gw32, log_p), (t16, loss16, gh16, gw16, _) = results["float32"], results["float16"]
    assert torch.equal(t16.ids, t32.ids) and torch.equal(t16.probs > 0, t32.probs > 0)
    p32, p16 = t32.probs.double(), t16.probs.double()
    assert ((p16 - p32).abs() <= 2**-11 * p32 + 2**-25).all()
    assert (p16 != p32).any()  # float16 did round
    dy = (p16 - p32).abs()
    bound = float((dy * -log_p.gather(1, t32.ids)).sum(1).mean())
    assert abs(loss16 - loss32) <= bound + 1e-6 and bound < 1e-3 * loss32
    for g16, g32 in ((gh16, gh32), (gw16, gw32)):
        torch.testing.assert_close(g16, g32, rtol=2**-10, atol=2**-10 * float(g32.abs().max()))


# ---- the folder ---------------------------------------------------------------------------------
def test_builds_are_deterministic_and_committed_by_meta(tmp_path: Path) -> None:
    prepared = fake_prepared(tmp_path / "data", random_tokens(5000, vocab=300, seed=4), vocab=300)
    folder, meta = write_ngram(prepared, 3, 4, chunk_tokens=1000, dtype="float32", progress=False)
    assert folder == ngram_dir(prepared, 3, 4) == prepared.dir / "ngram-n3-r4"
    first = {f: (folder / f).read_bytes() for f in ("ids.npy", "probs.npy")}
    assert (meta["n"], meta["r"], meta["train_tokens"], meta["dtype"]) == (3, 4, 5000, "float32")
    assert meta["key"]["bits_per_token"] == 9 and meta["key"]["key_bits"] == 27
    assert json.loads((folder / "meta.json").read_text())["fingerprint"] == "a" * 64
    arrays = load_ngram(prepared, 3, 4)
    assert set(arrays) == {"ngram_ids", "ngram_probs"} and arrays["ngram_ids"].shape == (5000, 4)
    # Same settings: nothing to do. force / another dtype: rebuilt, byte for byte the same.
    assert write_ngram(prepared, 3, 4, dtype="float32", progress=False)[1].get("skipped")
    write_ngram(prepared, 3, 4, dtype="float32", force=True, progress=False)
    assert {f: (folder / f).read_bytes() for f in first} == first
    meta16 = write_ngram(prepared, 3, 4, dtype="float16", progress=False)[1]
    assert not meta16.get("skipped") and load_ngram(prepared, 3, 4)["ngram_probs"].dtype == np.float16
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_a_failed_build_leaves_no_meta(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prepared = fake_prepared(tmp_path / "data", random_tokens(3000, vocab=20), vocab=20)
    folder, _ = write_ngram(prepared, 2, 2, progress=False)

    def crash(*args: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(ngram_build, "pack_context", crash)  # fails while writing the rows
    with pytest.raises(RuntimeError, match="disk full"):
        write_ngram(prepared, 2, 2, force=True, progress=False)
    assert not (folder / "meta.json").exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # temporaries removed
    with pytest.raises(SlmError, match=r"no 2-gram top-2 arrays .*run `slm ngram data=<same data> ngram.n=2 "):
        load_ngram(prepared, 2, 2)


def edit_meta(folder: Path, **changes: object) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, **changes}))


def test_load_ngram_rejects_mismatched_arrays(tmp_path: Path) -> None:
    prepared = fake_prepared(tmp_path / "data", random_tokens(1000, vocab=10), vocab=10)
    built, _ = write_ngram(prepared, 3, 2, progress=False)
    fix = r"run `slm ngram data=<same data> ngram.n=3 ngram.r=2` again"

    def damaged(name: str) -> Path:
        copy = tmp_path / name
        shutil.copytree(built, copy)
        return copy

    with pytest.raises(SlmError, match=r"no 3-gram top-5 arrays .*ngram.n=3 ngram.r=5` first"):
        load_ngram(prepared, 3, 5)
    folder = damaged("fingerprint")
    edit_meta(folder, fingerprint="0" * 64)
    with pytest.raises(SlmError, match=f"another version of the corpus.*{fix}"):
        load_ngram(prepared, 3, 2, path=folder)
    folder = damaged("tokenizer")
    edit_meta(folder, tokenizer_sha256="f" * 64)
    with pytest.raises(SlmError, match=f"another tokenizer.*{fix}"):
        load_ngram(prepared, 3, 2, path=folder)
    folder = damaged("short")
    np.save(folder / "ids.npy", np.load(folder / "ids.npy")[:-1])
    with pytest.raises(SlmError, match=rf"uint16 \(999, 2\) .* needs uint16 \(1,000, 2\): {fix}"):
        load_ngram(prepared, 3, 2, path=folder)
    folder = damaged("length")
    edit_meta(folder, train_tokens=1001)
    with pytest.raises(SlmError, match=f"meta.json: 1,001 tokens.*{fix}"):
        load_ngram(prepared, 3, 2, path=folder)
    folder = damaged("order")
    with pytest.raises(SlmError, match="n=3 r=2 arrays, not format 1 n=2 r=2: run `slm ngram"):
        load_ngram(prepared, 2, 2, path=folder)
    edit_meta(folder, dtype="int8")
    with pytest.raises(SlmError, match=f"corrupt .*meta.json .dtype 'int8'.*delete {folder}"):
        load_ngram(prepared, 3, 2, path=folder)
    (folder / "meta.json").write_text("{")
    with pytest.raises(SlmError, match=f"corrupt .*meta.json .*delete {folder}"):
        load_ngram(prepared, 3, 2, path=folder)


@pytest.mark.parametrize(
    ("n", "r", "vocab", "words"),
    [
        (1, 8, 512, "ngram.n=1 must be an integer >= 2"),
        (3, 0, 512, "ngram.r=0 must be between 1 and the vocabulary size 512"),
        (3, 513, 512, "ngram.r=513 must be between 1 and the vocabulary size 512"),
        (5, 8, 50257, "ngram.n=5 with vocabulary 50257 needs 80-bit n-gram keys (16 bits per token) but keys "
                      "are 64-bit: use ngram.n<=4 for this vocabulary"),
    ],
)
def test_bad_settings(n: int, r: int, vocab: int, words: str) -> None:
    with pytest.raises(SlmError, match=f"^{words.replace('(', '.').replace(')', '.')}"):
        build_ngram(np.zeros(10, np.uint16), vocab, n, r)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"chunk_tokens": 0}, "ngram.chunk_tokens=0 must be a positive integer"),
        ({"shards": 0}, "ngram.shards=0 must be a positive integer"),
        ({"dtype": "bfloat16"}, "ngram.dtype=bfloat16 is not supported: use one of float32, float16"),
    ],
)
def test_bad_build_options(kwargs: dict, words: str) -> None:
    with pytest.raises(SlmError, match=f"^{words}"):
        build_ngram(np.zeros(10, np.uint16), 10, 2, 2, **kwargs)


# ---- `slm ngram` --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ngram_data(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the tiny prepared data: the build adds an ngram-*/ folder to it."""
    data = tmp_path_factory.mktemp("ngram_data")
    shutil.copytree(tiny_data / "tiny", data / "tiny")
    return data


def test_slm_ngram_on_the_tiny_corpus(ngram_data: Path) -> None:
    args = ("ngram", f"paths.data_dir={ngram_data}", *TINY_DATA, "ngram.n=3", "ngram.r=4")
    proc = ok(slm(*args, cwd=ngram_data))
    folder = ngram_data / "tiny" / "ngram-n3-r4"
    assert f"built {folder}" in proc.stdout and "tokens/s" in proc.stdout
    prepared = load_prepared(ngram_data / "tiny")
    arrays = load_ngram(prepared, 3, 4)
    want_ids, want_probs = brute_force(np.asarray(prepared.tokens("train")), 3, 4)
    np.testing.assert_array_equal(arrays["ngram_ids"], want_ids)
    np.testing.assert_array_equal(arrays["ngram_probs"], want_probs.astype(np.float16))  # the default dtype
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["fingerprint"] == prepared.meta["fingerprint"] and meta["vocab_size"] == 512
    assert meta["dtype"] == "float16" and arrays["ngram_probs"].dtype == np.float16
    assert "up to date" in ok(slm(*args, cwd=ngram_data)).stdout
    assert (folder / "meta.json").read_text() == json.dumps(meta, indent=2) + "\n"  # untouched


def test_slm_ngram_bad_input_fails_in_one_line(ngram_data: Path) -> None:
    base = ("ngram", f"paths.data_dir={ngram_data}", *TINY_DATA)
    fails(slm(*base, "ngram.n=1", cwd=ngram_data), "ngram.n=1 must be an integer >= 2", "e.g. ngram.n=4")
    fails(slm(*base, "ngram.n=8", cwd=ngram_data), "needs 72-bit n-gram keys", "use ngram.n<=7")
    assert not (ngram_data / "tiny" / "ngram-n8-r8").exists()
