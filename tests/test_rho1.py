"""RHO-1: reference scoring against brute force, the selection rule, `slm score` + `slm train
selection=rho1` end to end (precomputed and online), a Hugging Face reference, bad input, and the
clean-vs-noise check that excess-loss selection keeps the learnable tokens."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models

from slm_cli.data.prepared import PreparedData, load_prepared
from slm_cli.data.windows import TrainWindows
from slm_cli.errors import SlmError
from slm_cli.flops import flops_per_token
from slm_cli.loss import TokenStats, token_stats
from slm_cli.model.gpt import GPT, GPTConfig
from slm_cli.reference.models import SlmReference, load
from slm_cli.reference.scores import default_name, load_scores_and_meta, score_stream
from slm_cli.selection.rho1 import Rho1
from tests.helpers import QUIET, TINY_DATA, TINY_MODEL, ok, select_as_training, slm, train
from tests.test_errors import fails
from tests.test_flops import counted_flops

BLOCK = 32  # TINY_MODEL's block_size
ROWS = 4 * BLOCK  # TINY_DATA's batch_size × BLOCK: tokens per micro-batch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: one thread is as fast as two, and immune to busy neighbours (the
    `slm` subprocesses inherit OMP_NUM_THREADS)."""
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = env


def word_tokenizer(vocab: int) -> Tokenizer:
    return Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))


def tiny_gpt(vocab: int, block_size: int, seed: int = 0, n_layer: int = 1) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, vocab_size=vocab, n_layer=n_layer, n_head=2, n_embd=32)).eval()


# ---- scoring: sliding windows vs one full-context forward per token -----------------------------
def brute_force_scores(model: GPT, tokens: np.ndarray, context: int, stride: int) -> np.ndarray:
    """The window rule restated: windows of `context` inputs start at 0, stride, 2·stride... while
    they fit, plus one flush with the end; token i is scored by the first window whose labels
    (start, start + context] contain it, from the tokens of that window before it."""
    n = len(tokens)
    c = min(context, n - 1)
    starts = list(range(0, n - c, stride))
    if starts[-1] + c < n - 1:
        starts.append(n - 1 - c)
    out = np.full(n, np.nan)
    for i in range(1, n):
        a = next(a for a in starts if a < i <= a + c)
        ctx = torch.tensor(tokens[a:i], dtype=torch.long)[None]
        with torch.no_grad():
            out[i] = -torch.log_softmax(model.logits(ctx)[0, -1].double(), -1)[tokens[i]].item()
    return out


@pytest.mark.parametrize(("n", "context", "stride"), [(41, 8, 3), (41, 8, 4), (40, 8, 8), (6, 8, 4), (2, 8, 1)])
def test_score_stream_matches_brute_force(n: int, context: int, stride: int) -> None:
    model = tiny_gpt(vocab=50, block_size=8)
    ref = SlmReference("tiny", model, word_tokenizer(50))
    tokens = np.random.default_rng(n + stride).integers(0, 50, n).astype(np.uint16)
    loss, entropy = score_stream(ref, tokens, context=context, stride=stride, batch_size=3, progress=False)
    expected = brute_force_scores(model, tokens, context, stride)
    assert loss.dtype == entropy.dtype == np.float32 and loss.shape == (n,)
    assert np.isnan(loss[0]) and np.isnan(entropy[0])
    np.testing.assert_allclose(loss[1:], expected[1:], rtol=1e-4, atol=1e-5)
    assert (entropy[1:] > 0).all() and (entropy[1:] <= math.log(model.config.padded_vocab) + 1e-4).all()


def test_score_stream_rejects_tokens_outside_the_vocabulary() -> None:
    ref = SlmReference("small", tiny_gpt(vocab=16, block_size=8), word_tokenizer(16))
    with pytest.raises(SlmError, match="outside the vocabulary.*data.tokenizer=small"):
        score_stream(ref, np.arange(20, dtype=np.uint16), context=8, stride=4, batch_size=4, progress=False)
    with pytest.raises(SlmError, match="context=9 exceeds"):
        score_stream(ref, np.arange(10, dtype=np.uint16), context=9, stride=4, batch_size=4, progress=False)


# ---- the selection rule ------------------------------------------------------------------------
def batch_of(ref_loss: torch.Tensor, ref_entropy: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    batch = {"ref_loss": ref_loss.view(4, -1)}
    if ref_entropy is not None:
        batch["ref_entropy"] = ref_entropy.view(4, -1)
    return batch


@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.6, 0.97])
@pytest.mark.parametrize("score", ["excess", "reference_loss", "reference_entropy"])
def test_rho1_keeps_the_top_k_by_score(ratio: float, score: str) -> None:
    g = torch.Generator().manual_seed(0)
    loss, ref_loss, ref_entropy = (torch.rand(60, generator=g) * 8 for _ in range(3))
    selected = select_as_training(Rho1(ratio=ratio, score=score), TokenStats(loss=loss, lse=loss),
                                  batch_of(ref_loss, ref_entropy))
    value = {"excess": loss - ref_loss, "reference_loss": -ref_loss, "reference_entropy": -ref_entropy}[score].tolist()
    k = math.ceil(ratio * 60)
    expected = sorted(range(60), key=lambda j: -value[j])[:k]
    assert selected.mask.sum() == k
    assert sorted(selected.mask.nonzero().squeeze(1).tolist()) == sorted(expected)
    assert selected.metrics["threshold"] == pytest.approx(sorted(value, reverse=True)[k - 1])
    assert selected.metrics["ref_loss"] == pytest.approx(ref_loss.mean().item())


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"ratio": 0}, "selection.ratio=0 must be in (0, 1)"),
        ({"ratio": 1}, "selection.ratio=1 must be in (0, 1)"),
        ({"ratio": 1.5}, "selection.ratio=1.5"),
        ({"score": "loss"}, "selection.score=loss is not known: use one of excess, reference_loss"),
        ({"reference": {"mode": "offline"}}, "selection.reference.mode=offline is not known"),
        ({"reference": {"mode": "online"}}, "selection.reference.ckpt_path="),
        ({"reference": {"mode": "online", "ckpt_path": "/no/such.ckpt"}}, "/no/such.ckpt does not exist"),
    ],
)
def test_rho1_bad_values(kwargs: dict, words: str) -> None:
    with pytest.raises(SlmError) as info:
        Rho1(**kwargs)
    assert words in str(info.value) and "\n" not in str(info.value)


# ---- clean vs noise: the reason RHO-1 works ------------------------------------------------------
V_SYN = 64


def synthetic_corpus(rng: np.random.Generator, n_segments: int, noise: bool) -> tuple[np.ndarray, np.ndarray]:
    """Clean segments follow x_{t+1} = x_t + 1 (mod V) from a random start; noise segments are
    uniform over the same V tokens. Returns (tokens, is_noise)."""
    parts, flags = [], []
    for _ in range(n_segments):
        length = int(rng.integers(16, 48))
        parts.append((rng.integers(V_SYN) + np.arange(length)) % V_SYN)
        flags.append(np.zeros(length, bool))
        if noise:
            length = int(rng.integers(6, 18))
            parts.append(rng.integers(0, V_SYN, length))
            flags.append(np.ones(length, bool))
    return np.concatenate(parts).astype(np.uint16), np.concatenate(flags)


def train_in_process(model: GPT, tokens: np.ndarray, steps: int, seed: int) -> GPT:
    windows = TrainWindows(tokens, model.config.block_size, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        batch = windows[np.arange(step * 16, (step + 1) * 16)]
        loss = model(batch["input_ids"], head=lambda h, w, y=batch["labels"]: F.cross_entropy(
            (h @ w.T).flatten(0, 1), y.flatten()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_excess_loss_selects_clean_tokens() -> None:
    """A reference trained on clean data only gives noise a high loss, so Δ = ℓ − ℓ_ref is low on
    noise and high on clean tokens: with ratio ≤ the clean share, ≥ 90% of the kept tokens are
    clean, for a model at initialisation (ℓ ≈ ln V everywhere, so Δ ranks by −ℓ_ref)."""
    rng = np.random.default_rng(0)
    clean, _ = synthetic_corpus(rng, 300, noise=False)
    mixed, is_noise = synthetic_corpus(rng, 300, noise=True)
    clean_share = 1 - is_noise.mean()
    assert 0.65 < clean_share < 0.8  # random selection would keep ≈ 25-35% noise

    reference = train_in_process(tiny_gpt(V_SYN, BLOCK, seed=0), clean, steps=150, seed=0)
    ref = SlmReference("clean-reference", reference, word_tokenizer(V_SYN))
    ref_loss, _ = score_stream(ref, mixed, context=BLOCK, stride=BLOCK // 2, batch_size=64, progress=False)
    assert np.nanmean(ref_loss[~is_noise]) < 1.0 < 3.0 < ref_loss[is_noise].mean()

    model = tiny_gpt(V_SYN, BLOCK, seed=1)  # the model being trained, at initialisation
    windows = TrainWindows(mixed, BLOCK, seed=1, token_arrays={"ref_loss": ref_loss})
    for ratio in (0.3, 0.5, math.floor(clean_share * 20) / 20):
        rho1 = Rho1(ratio=ratio)
        kept = kept_noise = 0
        for step in range(8):
            batch = windows[np.arange(step * 16, (step + 1) * 16)]
            with torch.no_grad():
                stats = model(batch["input_ids"], head=lambda h, w, y=batch["labels"]: token_stats(
                    h.flatten(0, 1), w, y.flatten(), keep_probs=False))
            mask = select_as_training(rho1, stats, batch).mask
            kept += int(mask.sum())
            kept_noise += int(is_noise[batch["positions"].flatten()[mask].numpy()].sum())
        assert kept == 8 * math.ceil(ratio * 16 * BLOCK - 1e-9)
        assert 1 - kept_noise / kept >= 0.9, (ratio, kept_noise / kept)


# ---- `slm score` and `slm train selection=rho1` through the CLI ------------------------------------
@pytest.fixture(scope="module")
def rho_data(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the tiny prepared data: scoring adds ref-*/ folders to it."""
    data = tmp_path_factory.mktemp("rho_data")
    shutil.copytree(tiny_data / "tiny", data / "tiny")
    return data


@pytest.fixture(scope="module")
def reference_ckpt(rho_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("rho_runs") / "ref"
    train(run, rho_data, "trainer.max_steps=30", "optim.lr=3e-3", "trainer.val_check_interval=30", cwd=run.parent)
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def scored(rho_data: Path, reference_ckpt: Path) -> Path:
    proc = ok(slm("score", f"paths.data_dir={rho_data}", *TINY_DATA, f"ckpt_path={reference_ckpt}", cwd=rho_data))
    folder = rho_data / "tiny" / "ref-ref"  # named after the run dir
    assert f"scored {folder}" in proc.stdout and "mean reference loss" in proc.stdout
    return folder


def test_score_writes_aligned_reference_losses(scored: Path, reference_ckpt: Path) -> None:
    prepared = load_prepared(scored.parent)
    meta = json.loads((scored / "meta.json").read_text())
    assert meta["train_tokens"] == prepared.meta["train_tokens"]
    assert meta["fingerprint"] == prepared.meta["fingerprint"]
    assert meta["tokenizer_sha256"] == prepared.meta["tokenizer_sha256"]
    assert (meta["context"], meta["stride"], meta["reference"]) == (BLOCK, BLOCK, str(reference_ckpt))  # a grid
    scores, _ = load_scores_and_meta(prepared)
    assert set(scores) == {"ref_loss", "ref_entropy"}
    assert scores["ref_loss"].shape == (prepared.meta["train_tokens"],) and scores["ref_loss"].dtype == np.float32
    assert not list(scored.glob(".*tmp"))
    # The first window: one forward of the reference over tokens[0:BLOCK].
    ref = load(str(reference_ckpt))
    window = torch.from_numpy(prepared.tokens("train")[: BLOCK + 1].astype(np.int64))[None]
    loss, entropy = ref.token_stats(window[:, :-1], window[:, 1:])
    np.testing.assert_allclose(scores["ref_loss"][1 : BLOCK + 1], loss[0].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scores["ref_entropy"][1 : BLOCK + 1], entropy[0].numpy(), rtol=1e-5, atol=1e-5)
    # Even 30 steps of training predict the corpus better than chance.
    assert np.nanmean(scores["ref_loss"]) < math.log(512) - 0.5


def expected_saved_frac(summary: dict) -> float:
    k = summary["selected_tokens"] / summary["train_tokens"]
    return 1 - (1 / 3 + 2 / 3 * k)


def test_rho1_trains_on_the_precomputed_scores(rho_data: Path, scored: Path, reference_ckpt: Path,
                                               tmp_path: Path) -> None:
    steps = 6
    summary = train(tmp_path / "run", rho_data, "selection=rho1", f"data.tokenizer={reference_ckpt}",
                    f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
                    "trainer.log_every_n_steps=1", cwd=tmp_path)
    assert summary["selection"] == "rho1" and summary["data"] == str(scored.parent)
    assert summary["train_tokens"] == steps * ROWS
    assert summary["selected_tokens"] == steps * math.ceil(0.6 * ROWS)
    assert summary["flops_saved_frac_nominal"] > 0
    assert summary["flops_saved_frac_nominal"] == pytest.approx(expected_saved_frac(summary), rel=1e-9)
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("selection/threshold")]
    assert rows and {"selection/threshold", "selection/ref_loss"} <= set(rows[0])
    assert 0 < float(rows[0]["selection/ref_loss"]) < math.log(512)


def test_rho1_online_counts_the_reference_forward(rho_data: Path, reference_ckpt: Path, tmp_path: Path) -> None:
    steps = 4
    summary = train(tmp_path / "run", rho_data, "selection=rho1", "selection.reference.mode=online",
                    f"selection.reference.ckpt_path={reference_ckpt}", f"data.tokenizer={reference_ckpt}",
                    "selection.score=reference_entropy", f"trainer.max_steps={steps}",
                    f"trainer.val_check_interval={steps}", cwd=tmp_path)
    assert summary["selected_tokens"] == steps * math.ceil(0.6 * ROWS)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    f_model = flops_per_token(GPTConfig(**ckpt["slm"]["model"]))
    # The reference's forward per token, measured by FlopCounterMode over one full window.
    ref = load(str(reference_ckpt))
    window = torch.randint(0, 512, (1, BLOCK + 1), generator=torch.Generator().manual_seed(0))
    f_ref_forward = counted_flops(lambda: ref.token_stats(window[:, :-1], window[:, 1:])) / BLOCK
    tokens, selected = summary["train_tokens"], summary["selected_tokens"]
    nominal = tokens * f_model / 3 + selected * 2 * f_model / 3 + tokens * f_ref_forward
    assert summary["flops_nominal"] == pytest.approx(nominal, rel=0.01)
    assert summary["flops_saved_frac_nominal"] == pytest.approx(expected_saved_frac(summary) - f_ref_forward / f_model,
                                                        abs=0.01)


# ---- bad input ---------------------------------------------------------------------------------------
def damaged_copy(scored: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "ref-copy"
    shutil.copytree(scored, copy)
    return copy


def edit_meta(folder: Path, **changes: object) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, **changes}))


def test_misaligned_or_mismatched_scores(scored: Path, tmp_path: Path) -> None:
    prepared = load_prepared(scored.parent)
    n = prepared.meta["train_tokens"]

    folder = damaged_copy(scored, tmp_path / "a")
    np.save(folder / "ref_loss.npy", np.load(folder / "ref_loss.npy")[:-1])
    with pytest.raises(SlmError, match=rf"float32 \({n - 1},\) .* needs float32 \({n:,}\): run `slm score"):
        load_scores_and_meta(prepared, path=str(folder))

    folder = damaged_copy(scored, tmp_path / "b")
    edit_meta(folder, train_tokens=n + 5)
    with pytest.raises(SlmError, match=rf"meta.json: {n + 5:,} tokens"):
        load_scores_and_meta(prepared, path=str(folder))

    folder = damaged_copy(scored, tmp_path / "c")
    edit_meta(folder, fingerprint="0" * 64)
    with pytest.raises(SlmError, match="another version of the corpus.*slm score"):
        load_scores_and_meta(prepared, path=str(folder))

    folder = damaged_copy(scored, tmp_path / "d")
    edit_meta(folder, tokenizer_sha256="f" * 64)
    with pytest.raises(SlmError, match="another tokenizer.*data.tokenizer="):
        load_scores_and_meta(prepared, path=str(folder))

    folder = damaged_copy(scored, tmp_path / "e")
    (folder / "meta.json").unlink()
    with pytest.raises(SlmError, match="needs reference losses"):
        load_scores_and_meta(prepared, path=str(folder))


def test_finding_the_score_folder(scored: Path, tmp_path: Path) -> None:
    prepared = load_prepared(scored.parent)
    empty = PreparedData(tmp_path, prepared.meta)
    with pytest.raises(SlmError, match="needs reference losses .*`slm score data=<same data> ckpt_path=<refe"):
        load_scores_and_meta(empty)
    for name in ("a", "b"):
        shutil.copytree(scored, tmp_path / f"ref-{name}")
    with pytest.raises(SlmError, match=r"several references \(a, b\): .*selection.reference.name="):
        load_scores_and_meta(empty)
    assert len(load_scores_and_meta(empty, name="b")[0]["ref_loss"]) == prepared.meta["train_tokens"]


def test_online_reference_with_another_vocabulary(reference_ckpt: Path, scored: Path, tmp_path: Path) -> None:
    prepared = load_prepared(scored.parent)
    other = PreparedData(tmp_path, {**prepared.meta, "tokenizer_sha256": "e" * 64, "vocab_size": 600})
    rho1 = Rho1(reference={"mode": "online", "ckpt_path": str(reference_ckpt)})
    assert rho1.token_arrays(prepared) == {}
    with pytest.raises(SlmError, match=f"vocabulary 512 .* has 600 .*data.tokenizer={reference_ckpt}") as err:
        rho1.token_arrays(other)
    assert str(err.value).startswith(f"selection.reference.ckpt_path={reference_ckpt} ")  # the setting the user gave


def test_rho1_without_reference_losses_fails_in_one_line(tiny_data: Path, tmp_path: Path) -> None:
    """Through the CLI: one line, non-zero exit, no run dir."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data / "tiny", data / "tiny")  # no ref-*/ folder
    run = tmp_path / "run"
    proc = slm("train", f"hydra.run.dir={run}", f"paths.data_dir={data}", *TINY_DATA, *TINY_MODEL, *QUIET,
               "selection=rho1", cwd=tmp_path)
    fails(proc, "needs reference losses", "slm score", "selection.reference.mode=online")
    assert not run.exists()


def test_score_folder_names(tmp_path: Path) -> None:
    (tmp_path / "run 1" / "checkpoints").mkdir(parents=True)
    for file in ("last.ckpt", "step0000100.ckpt"):
        (tmp_path / "run 1" / "checkpoints" / file).touch()
    assert default_name(str(tmp_path / "run 1" / "checkpoints" / "last.ckpt")) == "run_1"
    assert default_name(str(tmp_path / "run 1" / "checkpoints" / "step0000100.ckpt")) == "run_1-step0000100"
    assert default_name(str(tmp_path / "run 1")) == "run_1"


# ---- a Hugging Face reference --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_reference(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    transformers = pytest.importorskip("transformers")
    tokenizer = Tokenizer.from_file(str(tiny_data / "tiny" / "tokenizer.json"))
    vocab = tokenizer.get_vocab_size()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=BLOCK, vocab_size=vocab,
                                     bos_token_id=0, eos_token_id=0)
    folder = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def test_hf_reference_matches_transformers(hf_reference: Path) -> None:
    import transformers

    ref = load(str(hf_reference))
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_reference).eval()
    ids = torch.randint(0, ref.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    loss, entropy = ref.token_stats(ids[:, :-1], ids[:, 1:])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[:, :-1]).logits.double(), -1)
    expected = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), -(logp.exp() * logp).sum(-1), rtol=1e-5, atol=1e-5)
    # the accounting against what FlopCounterMode sees in a forward over a full context
    full = torch.randint(0, ref.vocab_size, (1, BLOCK + 1), generator=torch.Generator().manual_seed(1))
    measured = counted_flops(lambda: ref.token_stats(full[:, :-1], full[:, 1:])) / BLOCK
    assert ref.forward_flops_per_token == pytest.approx(measured, rel=0.02)
    assert ref.block_size == BLOCK and ref.kind == "hf"


def test_slm_score_with_a_hf_reference(hf_reference: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(Path(argparse.__file__).read_text()[:30000])
    ok(slm("score", f"paths.data_dir={tmp_path / 'data'}", "data=text", f"data.path={corpus}",
           f"ckpt_path={hf_reference}", "name='gpt2 tiny!'", "stride=8", cwd=tmp_path))
    # Prepared with the reference's tokenizer.json, in a folder of its own.
    (data,) = (tmp_path / "data").glob("corpus.tok-*")
    folder = data / "ref-gpt2_tiny"
    meta = json.loads((folder / "meta.json").read_text())
    assert (meta["context"], meta["stride"]) == (BLOCK, 8) and "Hugging Face gpt2" in meta["reference_describe"]
    prepared = load_prepared(data)
    assert prepared.meta["tokenizer"] == str(hf_reference / "tokenizer.json")
    scores, _ = load_scores_and_meta(prepared)
    assert abs(np.nanmean(scores["ref_loss"]) - math.log(512)) < 0.5  # random init: about ln V
    # Tokens of the first window are scored by one direct forward of the model.
    ref = load(str(hf_reference))
    window = torch.from_numpy(prepared.tokens("train")[: BLOCK + 1].astype(np.int64))[None]
    loss, _ = ref.token_stats(window[:, :-1], window[:, 1:])
    np.testing.assert_allclose(scores["ref_loss"][1 : BLOCK + 1], loss[0].numpy(), rtol=1e-5, atol=1e-5)


def test_hf_reference_without_transformers(hf_reference: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    with pytest.raises(SlmError, match=r"needs transformers and safetensors, which are not installed: pip install 'slm\[hf\]'"):
        load(str(hf_reference))


# ---- like with like: precomputed Δ compares the two models on the same windows ---------------------
def _model_loss(model: GPT, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(batch["input_ids"], head=lambda h, w: token_stats(
            h.flatten(0, 1), w, batch["labels"].flatten(), keep_probs=False)).loss


def test_reference_equal_to_the_model_gives_zero_excess(scored: Path, reference_ckpt: Path) -> None:
    """With the reference = the model itself the true excess loss is 0 everywhere. Training windows
    on `slm score`'s grid (what selection=rho1 uses) give Δ = 0 to float tolerance; windows at
    arbitrary offsets would not: their first labels have a shorter context than when scored."""
    prepared = load_prepared(scored.parent)
    rho1 = Rho1()
    arrays = rho1.token_arrays(prepared)
    grid = rho1.window_grid(BLOCK)
    assert grid == BLOCK
    model = load(str(reference_ckpt)).model
    for g, expect_zero in ((grid, True), (None, False)):
        windows = TrainWindows(prepared.tokens("train"), BLOCK, seed=5, token_arrays=arrays, grid=g)
        batch = windows[np.arange(16)]
        excess = _model_loss(model, batch) - batch["ref_loss"].flatten()
        if expect_zero:
            assert ((batch["positions"][:, 0] - 1) % BLOCK == 0).all()  # starts on the grid
            assert excess.abs().max() < 1e-4, excess.abs().max()
        else:
            assert excess.abs().max() > 1e-2  # the mismatch the grid removes


def test_precomputed_and_online_excess_agree(scored: Path, reference_ckpt: Path) -> None:
    prepared = load_prepared(scored.parent)
    precomputed, online = Rho1(), Rho1(reference={"mode": "online", "ckpt_path": str(reference_ckpt)})
    arrays = precomputed.token_arrays(prepared)
    windows = TrainWindows(prepared.tokens("train"), BLOCK, seed=9, token_arrays=arrays,
                           grid=precomputed.window_grid(BLOCK))
    batch = windows[np.arange(8)]
    stats = TokenStats(loss=torch.rand(8 * BLOCK), lse=torch.zeros(8 * BLOCK))
    a, b = precomputed.features(stats, batch), online.features(stats, batch)
    torch.testing.assert_close(a["ref_loss"], b["ref_loss"], rtol=1e-5, atol=1e-5)
    assert torch.equal(precomputed.select(a).mask, online.select(b).mask)


def test_training_refuses_scores_from_other_contexts(scored: Path) -> None:
    prepared = load_prepared(scored.parent)
    rho1 = Rho1()
    rho1.token_arrays(prepared)
    with pytest.raises(SlmError, match=f"model.block_size={2 * BLOCK} is longer .*context={2 * BLOCK}"):
        rho1.window_grid(2 * BLOCK)
    # A shorter training window would never train the labels past it in each scored window.
    with pytest.raises(SlmError, match=f"model.block_size={BLOCK // 2} is shorter .*context={BLOCK // 2}"):
        rho1.window_grid(BLOCK // 2)
    rho1.scores_meta = {**rho1.scores_meta, "stride": BLOCK // 2}
    with pytest.raises(SlmError, match=f"sliding windows .*stride={BLOCK}` \\(a grid"):
        rho1.window_grid(BLOCK)


def test_excess_is_not_reference_loss() -> None:
    """A model that already knows part of the data: segments of kind A (x+1) it has learned, of
    kind B (x+3) it has not; the reference knows both; noise is unpredictable for both. Excess
    loss keeps the learnable tokens the model does not know yet (B); the reference loss alone
    ranks A and B alike, so at the same ratio it keeps far fewer B tokens."""
    rng = np.random.default_rng(3)

    def corpus(kinds: tuple[int, ...], n: int) -> tuple[np.ndarray, np.ndarray]:
        parts, labels = [], []
        for _ in range(n):
            kind = int(rng.choice(kinds))
            length = int(rng.integers(16, 40))
            seg = rng.integers(0, V_SYN, length) if kind == 0 else (rng.integers(V_SYN) + kind * np.arange(length))
            parts.append(seg % V_SYN)
            labels.append(np.full(length, kind))
        return np.concatenate(parts).astype(np.uint16), np.concatenate(labels)

    model = train_in_process(tiny_gpt(V_SYN, BLOCK, seed=1), corpus((1,), 300)[0], steps=150, seed=1)
    reference = train_in_process(tiny_gpt(V_SYN, BLOCK, seed=2), corpus((1, 3), 300)[0], steps=250, seed=2)
    mixed, kind = corpus((0, 1, 3), 400)
    ref = SlmReference("ab-reference", reference, word_tokenizer(V_SYN))
    ref_loss, _ = score_stream(ref, mixed, context=BLOCK, stride=BLOCK, batch_size=64, progress=False)
    windows = TrainWindows(mixed, BLOCK, seed=4, token_arrays={"ref_loss": ref_loss}, grid=BLOCK)
    share_b = {}
    for score in ("excess", "reference_loss"):
        rho1, kept, kept_b = Rho1(ratio=0.25, score=score), 0, 0
        for step in range(6):
            batch = windows[np.arange(step * 16, (step + 1) * 16)]
            stats = TokenStats(loss=_model_loss(model, batch), lse=torch.zeros(16 * BLOCK))
            mask = select_as_training(rho1, stats, batch).mask
            kept += int(mask.sum())
            kept_b += int((kind[batch["positions"].flatten()[mask].numpy()] == 3).sum())
        share_b[score] = kept_b / kept
    assert share_b["excess"] >= 0.8 and share_b["reference_loss"] <= 0.65, share_b
