"""n-gram soft targets (arXiv 2407.02819): CoCoNTs and AllNTs against brute-force counts, the loss
against a dense float64 computation, λ = 0 as exact CLM, and composition with selection."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slm_cli.data.prepared import load_prepared
from slm_cli.data.windows import TrainWindows
from slm_cli.errors import SlmError
from slm_cli.loss import token_stats, weighted_loss
from slm_cli.ngram.build import write_ngram
from slm_cli.target.allnts import AllNTs
from slm_cli.target.coconts import CoCoNTs
from tests.helpers import QUIET, TINY_DATA, TINY_MODEL, ok, slm, train

N, R = 3, 4


@pytest.fixture(scope="module")
def prepared(tiny_data: Path):
    data = load_prepared(tiny_data / "tiny")
    write_ngram(data, N, R, dtype="float32", progress=False)  # float32: the tolerances below
    return data


@pytest.fixture(scope="module")
def counts(prepared) -> dict[tuple, Counter]:
    """Brute force: next-token counts of every (n−1)-token context of the training split."""
    tokens = prepared.tokens("train").tolist()
    table: dict[tuple, Counter] = defaultdict(Counter)
    for i in range(N - 1, len(tokens)):
        table[tuple(tokens[i - N + 1 : i])][tokens[i]] += 1
    return table


def batch_of(prepared, target, indices) -> dict[str, torch.Tensor]:
    windows = TrainWindows(prepared.tokens("train"), 16, seed=3, token_arrays=target.token_arrays(prepared))
    return windows[np.asarray(indices)]


def dense(targets, vocab: int) -> np.ndarray:
    y = torch.zeros(targets.ids.shape[0], vocab, dtype=torch.float64)
    y.scatter_add_(1, targets.ids, targets.probs.double())
    return y.numpy()


def y_all(counts, tokens: list[int], pos: int, vocab: int) -> np.ndarray:
    y = np.zeros(vocab)
    c = counts[tuple(tokens[pos - N + 1 : pos])]
    for v, k in c.items():
        y[v] = k / sum(c.values())
    return y


@pytest.mark.parametrize("lam", [0.3, 1.0])
def test_allnts_is_the_full_ngram_distribution(prepared, counts, lam: float) -> None:
    target = AllNTs(n=N, weight=lam)
    batch = batch_of(prepared, target, range(8))
    y = dense(target.targets(batch), prepared.vocab_size)
    tokens = prepared.tokens("train").tolist()
    for row, (pos, label) in enumerate(zip(batch["positions"].reshape(-1).tolist(),
                                           batch["labels"].reshape(-1).tolist(), strict=True)):
        expected = np.zeros(prepared.vocab_size)
        expected[label] += 1 - lam
        expected += lam * y_all(counts, tokens, pos, prepared.vocab_size)
        np.testing.assert_allclose(y[row], expected, atol=1e-7)  # float32 targets


def test_coconts_matches_its_definition_and_is_consistent(prepared, counts) -> None:
    """Row by row y^CC = y^all on top-r + 1[x ∉ top-r]·e_x; averaged over the positions sharing a
    context, y^CC = y^all (float32 storage: tolerance 1e-6)."""
    lam = 1.0
    target = CoCoNTs(n=N, r=R, weight=lam)
    batch = batch_of(prepared, target, range(64))
    y = dense(target.targets(batch), prepared.vocab_size)
    tokens = prepared.tokens("train").tolist()
    by_context: dict[tuple, list[np.ndarray]] = defaultdict(list)
    for row, (pos, label) in enumerate(zip(batch["positions"].reshape(-1).tolist(),
                                           batch["labels"].reshape(-1).tolist(), strict=True)):
        full = y_all(counts, tokens, pos, prepared.vocab_size)
        # top r by count, ties to the smaller id, computed independently of the builder
        top = sorted(np.flatnonzero(full), key=lambda v: (-full[v], v))[:R]
        expected = np.zeros_like(full)
        expected[top] = full[top]
        if label not in top:
            expected[label] += 1.0
        np.testing.assert_allclose(y[row], expected, atol=1e-6)
        by_context[tuple(tokens[pos - N + 1 : pos])].append(y[row])
    # consistency over the whole stream: every position of a few frequent contexts
    all_tokens = np.asarray(tokens)
    for context in sorted(counts, key=lambda c: -sum(counts[c].values()))[:3]:
        positions = [i for i in range(N - 1, len(tokens)) if tuple(tokens[i - N + 1 : i]) == context]
        b = {"labels": torch.from_numpy(all_tokens[positions]).long()[None],
             **{k: torch.from_numpy(np.asarray(v[positions]))[None] for k, v in target.token_arrays(prepared).items()}}
        mean = dense(target.targets(b), prepared.vocab_size).mean(0)
        np.testing.assert_allclose(mean, y_all(counts, tokens, positions[0], prepared.vocab_size), atol=1e-6)


@pytest.mark.parametrize("keep_probs", [True, False])
@pytest.mark.parametrize("rows", ["subset", "all"])
@pytest.mark.parametrize("kind", ["coconts", "allnts"])
def test_soft_target_loss_and_gradient_equal_dense_float64(prepared, kind: str, rows: str, keep_probs: bool) -> None:
    """The loss value and both gradients against dense float64 autograd: on a selection and with
    every row selected (the path that reuses the kept softmax in place), and with a chunk size so
    small that AllNTs' wide rows are cut into several blocks of entries (loss.SOFT_BLOCK)."""
    target = CoCoNTs(n=N, r=R, weight=0.4) if kind == "coconts" else AllNTs(n=N, weight=0.4)
    batch = batch_of(prepared, target, range(4))
    labels = batch["labels"].reshape(-1)
    targets = target.targets(batch)
    torch.manual_seed(0)
    m, d, v = labels.numel(), 8, 576
    hidden = torch.randn(m, d, requires_grad=True)
    weight = torch.randn(v, d, requires_grad=True)
    mask = torch.rand(m) < 0.6 if rows == "subset" else torch.ones(m, dtype=torch.bool)
    weights = mask.float() / mask.sum()
    chunk = 1 if kind == "allnts" else 7  # allnts: 16 entries per block, fewer than its widest row
    assert kind == "coconts" or targets.ids.shape[1] > 16
    stats = token_stats(hidden.detach(), weight.detach(), labels, chunk_size=chunk, keep_probs=keep_probs)
    loss = weighted_loss(hidden, weight, labels, weights, stats, targets=targets, chunk_size=chunk)
    loss.backward()
    assert stats.log_probs is None  # the kept softmax was taken over by the backward

    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    y = torch.from_numpy(dense(targets, v))
    ref = -(y * F.log_softmax(h64 @ w64.T, dim=-1)).sum(-1)[mask].mean()
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["coconts", "allnts"])
def test_incomplete_contexts_keep_the_one_hot_target(prepared, kind: str) -> None:
    """Positions before n−1 have no complete (n−1)-token context: their target is the one-hot
    next token with weight 1, and the rows after them are full soft targets."""
    target = CoCoNTs(n=N, r=R, weight=0.7) if kind == "coconts" else AllNTs(n=N, weight=0.7)
    arrays = target.token_arrays(prepared)
    tokens = np.asarray(prepared.tokens("train")).astype(np.int64)
    positions = np.arange(1, 9)  # position 1 < n − 1 = 2: incomplete; 2.. complete
    batch = {"labels": torch.from_numpy(tokens[positions])[None], "positions": torch.from_numpy(positions)[None],
             **{k: torch.from_numpy(np.asarray(a[positions]))[None] for k, a in arrays.items()}}
    y = dense(target.targets(batch), prepared.vocab_size)
    first = np.zeros(prepared.vocab_size)
    first[tokens[1]] = 1.0
    np.testing.assert_allclose(y[0], first, atol=1e-7)
    # the next row (position 2, complete) is a full target: its soft part is there, weighted λ
    assert y[1][tokens[2]] >= 1 - 0.7 - 1e-7 and y[1].sum() > 1 - 0.7 + 1e-3


def test_a_target_too_wide_for_the_budget_is_refused_up_front(prepared) -> None:
    from slm_cli.run import check_target_memory

    target = AllNTs(n=N, weight=0.5)
    target.token_arrays(prepared)
    check_target_memory(target, rows=128, limit_mb=1)
    with pytest.raises(SlmError, match="loss.max_target_mb=1: lower data.batch_size") as err:
        check_target_memory(target, rows=10**6, limit_mb=1)
    assert "\n" not in str(err.value) and f"{target.max_entries()} entries per token" in str(err.value)


def test_bad_target_settings() -> None:
    for kwargs, words in (({"weight": 1.5}, "target.weight=1.5"), ({"n": 1}, "target.n=1"),
                          ({"r": 0}, "target.r=0")):
        with pytest.raises(SlmError, match=words.replace(".", r"\.")):
            CoCoNTs(**kwargs)


def test_weight_zero_is_clm_exactly_and_selection_composes(prepared, tiny_data: Path, tmp_path: Path) -> None:
    common = ["trainer.max_steps=6", "trainer.val_check_interval=6"]
    clm = train(tmp_path / "clm", tiny_data, *common, cwd=tmp_path)
    zero = train(tmp_path / "zero", tiny_data, *common, "target=coconts", "target.weight=0",
                 f"target.n={N}", f"target.r={R}", cwd=tmp_path)
    assert zero["val_loss"] == clm["val_loss"] and zero["target"] == "coconts"
    a = torch.load(tmp_path / "clm/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "zero/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    both = train(tmp_path / "both", tiny_data, *common, "selection=eslm", "target=coconts", f"target.n={N}",
                 f"target.r={R}", cwd=tmp_path)
    assert both["selection"] == "eslm" and both["target"] == "coconts"
    assert both["selected_tokens"] == 6 * int(np.ceil(0.6 * 4 * 32))
    assert both["val_loss"] != clm["val_loss"]
    preset = train(tmp_path / "preset", tiny_data, *common, "target=coconts", f"target.n={N}", f"target.r={R}",
                   cwd=tmp_path)
    assert (preset["selection"], preset["target"]) == ("clm", "coconts")
    assert json.loads((tmp_path / "preset/summary.json").read_text())["selected_tokens"] == preset["train_tokens"]


def test_missing_ngram_arrays_is_one_line(tiny_data: Path, tmp_path: Path) -> None:
    proc = slm("train", f"hydra.run.dir={tmp_path}/run", f"paths.data_dir={tiny_data}", *TINY_DATA, *TINY_MODEL,
               *QUIET, "target=coconts", "target.n=2", "target.r=3", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("slm train: error: no 2-gram top-3 arrays")
    assert "slm ngram" in proc.stderr
    ok(slm("ngram", f"paths.data_dir={tiny_data}", *TINY_DATA, "ngram.n=2", "ngram.r=3", cwd=tmp_path))
