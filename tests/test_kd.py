"""ESLM-KD (`selection=eslm target=kd`): the teacher's targets and the loss against dense float64
computations, the top-k rule, the one-line checks, the teacher's FLOPs against FlopCounterMode, and
exact resume end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slm_cli.data.prepared import load_prepared
from slm_cli.data.windows import TrainWindows
from slm_cli.errors import SlmError
from slm_cli.flops import step_flops
from slm_cli.loss import token_stats, weighted_loss
from slm_cli.model.gpt import GPTConfig
from slm_cli.model.load import load_gpt
from slm_cli.selection.eslm import ESLM
from slm_cli.target.kd import KD
from tests.helpers import QUIET, TINY_DATA, TINY_MODEL, slm, train
from tests.test_flops import counted_flops

BLOCK = 32  # TINY_MODEL's block_size: the teacher's and the student's context


@pytest.fixture(scope="module")
def teacher(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run on the test data (so the same tokenizer), trained a little so that its
    distributions are not uniform."""
    run_dir = tmp_path_factory.mktemp("kd") / "teacher"
    train(run_dir, tiny_data, "trainer.max_steps=20", "trainer.val_check_interval=20", "optim.lr=3e-3",
          "optim.warmup_steps=5", cwd=run_dir.parent)
    return run_dir


@pytest.fixture(scope="module")
def prepared(tiny_data: Path):
    return load_prepared(tiny_data / "tiny")


def batch_of(prepared, rows: int = 2) -> dict[str, torch.Tensor]:
    return TrainWindows(prepared.tokens("train"), BLOCK, seed=3)[np.arange(rows)]


def teacher_probs64(teacher: Path, batch: dict[str, torch.Tensor], vocab: int, temperature: float) -> torch.Tensor:
    """An independent float64 path: the teacher's full logits (no head callable, no chunks), cut
    to the tokenizer's vocabulary, softmax at T."""
    model, _ = load_gpt(teacher)
    logits = model.double().logits(batch["input_ids"])[..., :vocab].reshape(-1, vocab)
    return torch.softmax(logits / temperature, dim=-1)


def dense(targets, vocab: int) -> torch.Tensor:
    y = torch.zeros(targets.ids.shape[0], vocab, dtype=torch.float64)
    return y.scatter_add_(1, targets.ids, targets.probs.double())


def expected_targets(q: torch.Tensor, labels: torch.Tensor, lam: float, k: int) -> torch.Tensor:
    """The documented rule in float64: y = (1 − λ)·e_x + λ·(top-k of q + (1 − Σ top-k)·e_x)."""
    soft = torch.zeros_like(q)
    top = q.argsort(dim=-1, descending=True, stable=True)[:, :k]
    soft.scatter_(1, top, q.gather(1, top))
    rows = torch.arange(len(labels))
    soft[rows, labels] += 1.0 - q.gather(1, top).sum(-1)
    y = lam * soft
    y[rows, labels] += 1.0 - lam
    return y


def check_loss_and_gradients(targets, labels: torch.Tensor, y64: torch.Tensor) -> None:
    """weighted_loss on ESLM's selection against dense float64 autograd of Σ_S CE(y, p) / |S|,
    with a student head padded past the vocabulary (ids ≥ V are classes no target uses)."""
    torch.manual_seed(0)
    m, d, vp = labels.numel(), 8, 576
    hidden = torch.randn(m, d, requires_grad=True)
    weight = torch.randn(vp, d, requires_grad=True)
    stats = token_stats(hidden.detach(), weight.detach(), labels, chunk_size=7)
    mask = ESLM(alpha=0.4).select({"loss": stats.loss}).mask
    assert 0 < mask.sum() < m
    weights = mask.float() / mask.sum()
    loss = weighted_loss(hidden, weight, labels, weights, stats, targets=targets, chunk_size=7)
    loss.backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    y = torch.zeros(m, vp, dtype=torch.float64)
    y[:, : y64.shape[1]] = y64
    ref = -(y * F.log_softmax(h64 @ w64.T, dim=-1)).sum(-1)[mask].mean()
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_whole_vocabulary_is_the_full_teacher_distribution(teacher: Path, prepared, temperature: float) -> None:
    """top_k = V: y = (1 − λ)·e_x + λ·softmax(z/T), and the loss is (1 − λ)·CE(label) +
    λ·CE(q, p) = (1 − λ)·ℓ + λ·(KL(q‖p) + H(q)) on the selected rows, against float64."""
    lam, vocab = 0.3, prepared.vocab_size
    batch = batch_of(prepared)
    labels = batch["labels"].reshape(-1)
    q = teacher_probs64(teacher, batch, vocab, temperature)
    for top_k in (vocab, None, 10 * vocab):  # all mean the whole distribution
        target = KD(teacher=str(teacher), top_k=top_k, temperature=temperature, weight=lam)
        assert target.max_entries() == 1 + vocab
        targets = target.targets(batch)
        assert targets.ids.shape == (labels.numel(), 1 + vocab)
        y = dense(targets, vocab)
        expected = lam * q
        expected[torch.arange(len(labels)), labels] += 1 - lam
        torch.testing.assert_close(y, expected, rtol=0, atol=2e-6)
    check_loss_and_gradients(targets, labels, expected)
    assert temperature == 1.0 or not torch.allclose(q, teacher_probs64(teacher, batch, vocab, 1.0))


@pytest.mark.parametrize(("top_k", "temperature"), [(1, 1.0), (5, 1.0), (5, 2.0)])
def test_top_k_puts_the_rest_on_the_label(teacher: Path, prepared, top_k: int, temperature: float) -> None:
    lam, vocab = 0.6, prepared.vocab_size
    batch = batch_of(prepared)
    labels = batch["labels"].reshape(-1)
    target = KD(teacher=str(teacher), top_k=top_k, temperature=temperature, weight=lam)
    assert target.max_entries() == 1 + top_k
    targets = target.targets(batch)
    assert targets.ids.shape == (labels.numel(), 1 + top_k)
    y = dense(targets, vocab)
    expected = expected_targets(teacher_probs64(teacher, batch, vocab, temperature), labels, lam, top_k)
    torch.testing.assert_close(y, expected, rtol=0, atol=2e-6)
    torch.testing.assert_close(y.sum(-1), torch.ones(len(labels), dtype=torch.float64), rtol=0, atol=1e-5)
    assert (y.max(-1).values < 1 - 1e-3).any()  # soft rows: the teacher is not one-hot
    check_loss_and_gradients(targets, labels, expected)


def test_weight_zero_is_the_one_hot_path(teacher: Path, prepared) -> None:
    target = KD(teacher=str(teacher), weight=0.0)
    assert target.targets(batch_of(prepared)) is None and target.extra_forward_flops(1000) == 0.0


def test_hugging_face_teacher_gives_the_same_targets(teacher: Path, prepared, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from slm_cli.model.export import export

    folder = export(teacher, tmp_path / "hf")
    batch = batch_of(prepared)
    slm_t = KD(teacher=str(teacher), top_k=7, temperature=1.5, weight=0.5)
    hf_t = KD(teacher=str(folder), top_k=7, temperature=1.5, weight=0.5)
    assert hf_t.teacher.kind == "hf"
    hf_t.token_arrays(prepared)  # the exported tokenizer is the data's
    a, b = slm_t.targets(batch), hf_t.targets(batch)
    torch.testing.assert_close(dense(a, prepared.vocab_size), dense(b, prepared.vocab_size), rtol=0, atol=1e-5)
    assert hf_t.teacher.forward_flops_per_token == slm_t.teacher.forward_flops_per_token


def altered_checkpoint(teacher: Path, out: Path, *, block_size: int | None = None, tokenizer_json: str | None = None) -> Path:
    """The teacher's checkpoint with a shorter context (its first position embeddings) or another
    tokenizer: what a teacher trained differently would hold."""
    ckpt = torch.load(teacher / "checkpoints" / "last.ckpt", weights_only=True)
    if block_size is not None:
        ckpt["slm"]["model"]["block_size"] = block_size
        wpe = "model.transformer.wpe.weight"
        ckpt["state_dict"][wpe] = ckpt["state_dict"][wpe][:block_size].clone()
    if tokenizer_json is not None:
        ckpt["slm"]["tokenizer_json"] = tokenizer_json
    torch.save(ckpt, out)
    return out


def test_teacher_with_another_tokenizer_fails_in_one_line(teacher: Path, prepared, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    other = Tokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.ByteLevel()
    other.train_from_iterator(["another corpus entirely, with another vocabulary"] * 10,
                              trainers.BpeTrainer(vocab_size=300, show_progress=False))
    ckpt = altered_checkpoint(teacher, tmp_path / "other.ckpt", tokenizer_json=other.to_str())
    target = KD(teacher=str(ckpt))
    with pytest.raises(SlmError, match=f"prepare the data with data.tokenizer={ckpt}$") as err:
        target.token_arrays(prepared)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"target.teacher={ckpt} ")
    KD(teacher=str(teacher)).token_arrays(prepared)  # the data's own tokenizer passes


def test_teacher_with_a_shorter_context_fails_in_one_line(teacher: Path, prepared, tiny_data: Path,
                                                          tmp_path: Path) -> None:
    ckpt = altered_checkpoint(teacher, tmp_path / "short.ckpt", block_size=16)
    target = KD(teacher=str(ckpt))
    with pytest.raises(SlmError, match=r"training windows of 32 tokens exceed the context of target.teacher=.* \(16 tokens\): "
                                       r"lower model.block_size to 16") as err:
        target.targets(batch_of(prepared))
    assert "\n" not in str(err.value)
    # the same, raised inside a training step, reaches the user as one line
    proc = slm("train", f"hydra.run.dir={tmp_path}/run", f"paths.data_dir={tiny_data}", *TINY_DATA, *TINY_MODEL,
               *QUIET, "trainer.max_steps=1", "selection=eslm", "target=kd", f"target.teacher={ckpt}", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"slm train: error: {err.value}"


def test_bad_settings(teacher: Path) -> None:
    for kwargs, words in (({"teacher": None}, "target=kd needs a teacher: pass target.teacher="),
                          ({"temperature": 0}, "target.temperature=0 must be a positive number"),
                          ({"top_k": 0}, "target.top_k=0 must be a positive integer or null"),
                          ({"weight": 1.5}, "target.weight=1.5")):
        with pytest.raises(SlmError, match=words.replace(".", r"\.").replace("(", r"\(")) as err:
            KD(**{"teacher": str(teacher), **kwargs})
        assert "\n" not in str(err.value)


def test_eslm_kd_end_to_end_counts_the_teacher_and_resumes_exactly(teacher: Path, prepared, tiny_data: Path,
                                                                   tmp_path: Path) -> None:
    """`slm train selection=eslm target=kd`: the nominal and realised FLOPs are the student's plus
    tokens × the teacher's forward as FlopCounterMode measures it; 4 steps in one go equal a resume
    from step 2 to 4."""
    common = ["selection=eslm", "target=kd", f"target.teacher={teacher}", "target.top_k=8", "target.temperature=2",
              "optim.decay_steps=4", "optim.warmup_steps=1", "trainer.val_check_interval=2",
              "trainer.checkpoint_every_n_steps=2"]
    whole = train(tmp_path / "whole", tiny_data, "trainer.max_steps=4", *common, cwd=tmp_path)
    # its periodic checkpoint at step 2 is where a 2-step run would stop
    resumed = train(tmp_path / "resumed", tiny_data, "trainer.max_steps=4",
                    f"ckpt_path={tmp_path}/whole/checkpoints/step0000002.ckpt", *common, cwd=tmp_path)
    assert (whole["selection"], whole["target"]) == ("eslm", "kd")
    assert resumed["steps"] == 4 and abs(resumed["val_loss"] - whole["val_loss"]) < 1e-6
    for key in ("train_tokens", "selected_tokens", "flops_realized", "flops_nominal", "flops_clm"):
        assert resumed[key] == whole[key], key
    a = torch.load(tmp_path / "whole/checkpoints/last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "resumed/checkpoints/last.ckpt", weights_only=True)
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=0, atol=1e-6)

    # The teacher's forward over one micro-batch, as the target runs it, counted by FlopCounterMode.
    batch = batch_of(prepared, rows=4)
    target = KD(teacher=str(teacher), top_k=8, temperature=2.0)
    measured = counted_flops(lambda: target.targets(batch)) / batch["input_ids"].numel()
    assert measured > 0 and target.extra_forward_flops(1) == measured
    tokens, selected = whole["train_tokens"], whole["selected_tokens"]
    assert tokens == 4 * 4 * BLOCK and selected == 4 * int(np.ceil(0.6 * 4 * BLOCK))
    student = step_flops(GPTConfig(**a["slm"]["model"]), tokens, selected)  # linear in tokens and selected
    assert whole["flops_nominal"] == pytest.approx(student.nominal + tokens * measured, rel=1e-12)
    assert whole["flops_realized"] == pytest.approx(student.realized + tokens * measured, rel=1e-12)
    assert whole["flops_clm"] == student.clm
