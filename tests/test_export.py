"""Interop with Hugging Face transformers: `slm export`, trainer.export_at_end, init_from, `slm sample`.

The references are independent of slm's own code paths: transformers' GPT2LMHeadModel and its
`generate`, AutoTokenizer, and the run's own checkpoint (its logits, tokenizer and validation loss).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from slm_cli.errors import SlmError
from slm_cli.model.export import export
from slm_cli.model.generate import generate
from slm_cli.model.gpt import GPT, GPTConfig
from slm_cli.model.hf import hf_state_dict, load_hf_state_dict
from slm_cli.model.load import init_weights, load_gpt
from slm_cli.outputs import load_checkpoint
from tests.helpers import earlier_summary, ok, slm, train

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

STEPS = ["trainer.max_steps=10", "trainer.val_check_interval=10", "optim.warmup_steps=2", "optim.lr=3e-3"]
CPU = ["trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=2"]
TEXT = "def f(x):\n\treturn  x + 1   <|endoftext|>\n\n  class  Émile:  pass  # 日本語 ok\r\n\n<|endoftext|>"


@pytest.fixture(scope="module")
def run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run that exports itself at the end (trainer.export_at_end=true)."""
    root = tmp_path_factory.mktemp("export")
    train(root / "run", tiny_data, *STEPS, "trainer.export_at_end=true", cwd=root)
    return root / "run"


@pytest.fixture(scope="module")
def exported(run: Path) -> Path:
    """`slm export` of the run's last.ckpt into a fresh folder."""
    out = run.parent / "exported"
    proc = ok(slm("export", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"out={out}", cwd=run.parent))
    assert str(out) in proc.stdout
    return out


def slm_tokenizer(run: Path) -> Tokenizer:
    return Tokenizer.from_str(load_checkpoint(run / "checkpoints" / "last.ckpt", tensors=False)["slm"]["tokenizer_json"])


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return safetensors_torch.load_file(folder / "model.safetensors")


# ---- the exported folder --------------------------------------------------------------------------------
def test_exported_logits_equal_slm(run: Path, exported: Path) -> None:
    model, _ = load_gpt(run)
    tokenizer = slm_tokenizer(run)
    vocab = tokenizer.get_vocab_size()
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert hf.config.vocab_size == vocab and hf.config.n_positions == model.config.block_size
    eos = tokenizer.token_to_id("<|endoftext|>")
    assert hf.config.eos_token_id == hf.config.bos_token_id == eos and hf.config.tie_word_embeddings
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    assert hf.generation_config.eos_token_id == eos
    ids = torch.randint(0, vocab, (3, model.config.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model.logits(ids)[..., :vocab], rtol=0, atol=1e-5)


def test_autotokenizer_gives_slm_ids(run: Path, exported: Path) -> None:
    tokenizer = slm_tokenizer(run)
    auto = transformers.AutoTokenizer.from_pretrained(exported)
    assert auto.is_fast and auto.eos_token == "<|endoftext|>"
    assert auto.eos_token_id == tokenizer.token_to_id("<|endoftext|>")
    expected = tokenizer.encode(TEXT).ids
    assert expected.count(auto.eos_token_id) == 2  # the EOS text is the special token, twice
    assert auto(TEXT)["input_ids"] == expected
    assert auto.decode(expected) == TEXT == tokenizer.decode(expected, skip_special_tokens=False)


def test_export_at_end_equals_slm_export(run: Path, exported: Path) -> None:
    at_end = run / "hf"
    assert sorted(p.name for p in at_end.iterdir()) == sorted(p.name for p in exported.iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json"]
    a, b = weights(at_end), weights(exported)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (at_end / "config.json").read_text() == (exported / "config.json").read_text()
    # the model card: the run's config and its figures
    summary = json.loads((run / "summary.json").read_text())
    card = (exported / "README.md").read_text()
    assert "library_name: transformers" in card and "selection:" in card and "target:" in card
    assert f"| tokens seen | {summary['train_tokens']:,} |" in card
    assert f"| `val_loss` | {summary['val_loss']:.6g} |" in card
    # no staging folder left
    assert not [p for p in run.parent.iterdir() if p.name.startswith(".")]
    assert not [p for p in run.iterdir() if p.name.startswith(".hf")]


def card_figures(card: str) -> dict[str, float]:
    """The model card's run summary table: key -> value."""
    rows = (line.split(" | ") for line in card.splitlines() if line.startswith("| `"))
    return {row[0][3:-1]: float(row[1].replace(",", "")) for row in rows}


def test_a_run_with_earlier_summary_keys_exports_the_same_card(run: Path, exported: Path, tmp_path: Path) -> None:
    """The run dir with its summary.json rewritten as the oldest runs wrote it (flops_total,
    flops_clm_equivalent, flops_saved_frac): the card shows the figures under today's keys."""
    summary = json.loads((run / "summary.json").read_text())
    old_run = tmp_path / "old_run"
    shutil.copytree(run, old_run, ignore=shutil.ignore_patterns("hf"))
    (old_run / "summary.json").write_text(json.dumps(earlier_summary(summary)))
    card = card_figures((export(old_run, tmp_path / "out") / "README.md").read_text())
    today = card_figures((exported / "README.md").read_text())
    for key in ("flops_realized", "flops_clm", "flops_nominal", "flops_saved_frac_nominal",
                "flops_saved_frac_realized", "val_loss", "steps"):
        assert card[key] == pytest.approx(summary[key], rel=1e-5) == today[key], key


def test_exported_folder_is_a_reference_and_a_tokenizer(run: Path, exported: Path, tiny_data: Path) -> None:
    """RHO-1's reference loading and `data.tokenizer=` take the exported folder as they are."""
    from slm_cli.reference.models import load

    hf_ref, slm_ref = load(str(exported)), load(str(run))
    assert hf_ref.kind == "hf" and slm_ref.kind == "slm"
    meta = json.loads((tiny_data / "tiny" / "meta.json").read_text())
    assert hf_ref.tokenizer_sha256 == slm_ref.tokenizer_sha256 == meta["tokenizer_sha256"]
    ids = torch.randint(0, hf_ref.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    for a, b in zip(hf_ref.token_stats(ids[:, :-1], ids[:, 1:]), slm_ref.token_stats(ids[:, :-1], ids[:, 1:]),
                    strict=True):
        # the vocabulary (512) is a multiple of 64: no padding rows, the same softmax
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def parallel_runs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same 2 steps under DDP and under FSDP (sharded checkpoint), each exporting at the end."""
    root = tmp_path_factory.mktemp("parallel")
    common = ["trainer.max_steps=2", "trainer.val_check_interval=2", "optim.warmup_steps=1", "data.batch_size=2",
              "trainer.export_at_end=true", *CPU]
    for name in ("ddp", "fsdp"):
        train(root / name, tiny_data, f"trainer={name}", *common, cwd=root)
    return {"ddp": root / "ddp", "fsdp": root / "fsdp"}


def test_export_from_sharded_fsdp_equals_ddp(parallel_runs: dict[str, Path]) -> None:
    sharded = parallel_runs["fsdp"] / "checkpoints" / "last.ckpt"
    assert sharded.is_dir()
    out = export(sharded, parallel_runs["fsdp"].parent / "from-shards")  # consolidated in this one process
    ddp = weights(parallel_runs["ddp"] / "hf")
    for folder in (out, parallel_runs["fsdp"] / "hf"):  # slm export, and export_at_end on rank 0
        got = weights(folder)
        assert got.keys() == ddp.keys()
        assert max((got[k] - ddp[k]).abs().max().item() for k in ddp) < 1e-5
        assert json.loads((folder / "config.json").read_text()) == json.loads(
            (parallel_runs["ddp"] / "hf" / "config.json").read_text())
        assert (folder / "tokenizer.json").read_text() == (parallel_runs["ddp"] / "hf" / "tokenizer.json").read_text()
    for run in parallel_runs.values():  # rank 1 wrote no export of its own
        assert not [p for p in run.iterdir() if p.name.startswith(".hf")]


# ---- bad input: one line, nothing written ----------------------------------------------------------------
def test_bad_inputs_are_one_line_and_leave_nothing(run: Path, tmp_path: Path) -> None:
    ckpt = run / "checkpoints" / "last.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[:4096])
    half_sharded = tmp_path / "step0000010.ckpt"  # a sharded folder whose meta.pt was never written
    half_sharded.mkdir()
    (half_sharded / "__0_0.distcp").write_bytes(b"\0" * 64)
    unknown = tmp_path / "unknown.ckpt"
    saved = load_checkpoint(ckpt)
    saved["slm"]["model"]["n_experts"] = 8
    torch.save(saved, unknown)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    cases = {
        str(tmp_path / "missing.ckpt"): "does not exist",
        str(truncated): "corrupt or not an slm checkpoint",
        str(half_sharded): "not an slm run dir",
        str(unknown): "a model this slm does not know",
    }
    for spec, reason in cases.items():
        with pytest.raises(SlmError, match=reason) as err:
            export(spec, tmp_path / "out")
        assert "\n" not in str(err.value)
    with pytest.raises(SlmError, match="already exists and is not empty"):
        export(ckpt, full)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "step0000010.ckpt", "truncated.ckpt", "unknown.ckpt"]
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    # through the CLI: one line on stderr, exit 1
    proc = slm("export", f"ckpt_path={unknown}", f"out={tmp_path / 'out'}", cwd=tmp_path)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("slm export: error: ")
    assert not (tmp_path / "out").exists()


def test_missing_extra_is_one_line(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    with pytest.raises(SlmError, match=r"pip install 'slm\[hf\]'"):
        export(run, tmp_path / "out")
    assert not list(tmp_path.iterdir())


def test_empty_out_folder_is_used(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    export(run, out)
    assert (out / "model.safetensors").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


# ---- init_from -------------------------------------------------------------------------------------------
def test_hf_weights_round_trip_with_padding_rows() -> None:
    """A vocabulary that is not a multiple of 64: the export drops the padding rows, the import
    refills them with the mean row, and the real logits are unchanged."""
    torch.manual_seed(0)
    source = GPT(GPTConfig(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embd=32)).eval()
    copy = GPT(source.config).eval()
    load_hf_state_dict(copy, hf_state_dict(source), "test")
    ids = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(copy.logits(ids)[..., :100], source.logits(ids)[..., :100], rtol=0, atol=0)
    wte = source.transformer.wte.weight
    torch.testing.assert_close(copy.transformer.wte.weight[100:], wte[:100].mean(0).expand(28, -1))
    assert copy.lm_head.weight is copy.transformer.wte.weight


def test_init_weights_checks_shape_and_tokenizer(run: Path, exported: Path) -> None:
    source, entry = load_gpt(run)
    for spec in (run, exported):
        target = GPT(source.config)
        init_weights(target, str(spec), entry["tokenizer_json"])
        for name, tensor in source.state_dict().items():
            assert torch.equal(target.state_dict()[name], tensor), name
    other = GPTConfig(**{**entry["model"], "n_layer": 3})
    with pytest.raises(SlmError, match=r"model.n_layer=3 \(.*: 2\)"):
        init_weights(GPT(other), str(exported), entry["tokenizer_json"])
    tokenizer = json.loads(entry["tokenizer_json"])
    tokenizer["model"]["merges"] = tokenizer["model"]["merges"][:-1]
    with pytest.raises(SlmError, match="another tokenizer.*data.tokenizer="):
        init_weights(GPT(source.config), str(exported), json.dumps(tokenizer))


def test_init_from_exported_folder_starts_at_the_source(run: Path, exported: Path, tiny_data: Path,
                                                        tmp_path: Path) -> None:
    """A run initialised from the export, with a learning rate too small to move the weights,
    validates (same windows) at the source's final validation loss; its counters start at 0."""
    source = json.loads((run / "summary.json").read_text())
    steps = ["trainer.max_steps=1", "trainer.val_check_interval=1", "optim.warmup_steps=0", "optim.lr=1e-12"]
    started = train(tmp_path / "init", tiny_data, f"init_from={exported}", *steps, cwd=tmp_path)
    assert started["val_loss"] == pytest.approx(source["val_loss"], abs=1e-5)
    assert started["steps"] == 1 and started["train_tokens"] == 4 * 32
    # Restarted, the run resumes from its own last.ckpt, and init_from is ignored (with a log line).
    resumed = train(tmp_path / "init", tiny_data, f"init_from={exported}", *steps[1:], "trainer.max_steps=2",
                    cwd=tmp_path)
    assert resumed["steps"] == 2 and resumed["train_tokens"] == 2 * 4 * 32
    assert f"init_from={exported} ignored: resuming from" in (tmp_path / "init" / "train.log").read_text()


# ---- sampling --------------------------------------------------------------------------------------------
def test_greedy_sample_equals_transformers_generate(run: Path, exported: Path) -> None:
    from slm_cli.evaluate.sample import sample

    prompt, n = "def f(x):\n    return", 24
    auto = transformers.AutoTokenizer.from_pretrained(exported)
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    ids = torch.tensor([auto(prompt)["input_ids"]])
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                               pad_token_id=auto.eos_token_id)[0, ids.shape[1]:].tolist()
    model, _ = load_gpt(run)
    got = generate(model, ids, n, temperature=0, eos_id=auto.eos_token_id)[0].tolist()
    assert got[: len(expected)] == expected
    if auto.eos_token_id in expected:
        expected = expected[: expected.index(auto.eos_token_id)]
    text = auto.decode(expected)
    assert sample(str(run), prompt, max_new_tokens=n, temperature=0) == [text]
    assert sample(str(exported), prompt, max_new_tokens=n, temperature=0) == [text]  # an HF folder too
    proc = ok(slm("sample", f"ckpt_path={run}", f"prompt='{prompt}'", f"max_new_tokens={n}", "temperature=0",
                  cwd=run.parent))
    assert proc.stdout == f"{prompt}{text}\n"


def test_sampling_seeds(run: Path) -> None:
    from slm_cli.evaluate.sample import sample

    kw = dict(max_new_tokens=40, temperature=1.0, stop_at_eos=False)
    a = sample(str(run), "import os", seed=1, num_samples=2, **kw)
    assert len(a) == 2 and a[0] != a[1]
    assert sample(str(run), "import os", seed=1, num_samples=2, **kw) == a
    assert sample(str(run), "import os", seed=2, num_samples=2, **kw) != a
    # top_k=1 leaves only the most likely token: greedy, whatever the seed
    greedy = sample(str(run), "import os", max_new_tokens=20, temperature=0)
    assert sample(str(run), "import os", max_new_tokens=20, temperature=1.0, top_k=1, seed=3) == greedy
    with pytest.raises(SlmError, match="temperature=-1 must be"):
        sample(str(run), "x", temperature=-1)


def test_long_prompt_is_cropped_from_the_left(run: Path) -> None:
    model, _ = load_gpt(run)
    block = model.config.block_size
    ids = torch.randint(0, model.config.vocab_size, (1, 3 * block), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(generate(model, ids, 8, temperature=0), generate(model, ids[:, -block:], 8, temperature=0))
