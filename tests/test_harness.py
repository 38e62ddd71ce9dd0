"""`slm eval tasks=...`: lm-evaluation-harness on slm's model agrees with slm's own scoring of the same
examples, written independently here (float64, one example at a time, full logits, no batching)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.helpers import ok, slm, train

pytest.importorskip("lm_eval", reason="the eval extra: pip install 'slm[eval]'")

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "slm_cli" / "evaluate" / "tasks"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
LIMIT = 40


@pytest.fixture(scope="module")
def run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained long enough that its scores are not uniform."""
    run_dir = tmp_path_factory.mktemp("harness") / "run"
    train(run_dir, tiny_data, "trainer.max_steps=80", "optim.lr=3e-3", cwd=run_dir.parent)
    return run_dir


@pytest.fixture(scope="module")
def reference(run: Path) -> SimpleNamespace:
    """slm's model in float64 and its tokenizer, for the independent scoring below."""
    from tokenizers import Tokenizer

    from slm_cli.model.load import load_gpt

    model, entry = load_gpt(run)
    return SimpleNamespace(model=model.double().eval(), tok=Tokenizer.from_str(entry["tokenizer_json"]),
                           eos=Tokenizer.from_str(entry["tokenizer_json"]).token_to_id("<|endoftext|>"))


def encode(ref: SimpleNamespace, text: str) -> list[int]:
    return ref.tok.encode(text, add_special_tokens=False).ids


def token_scores(ref: SimpleNamespace, tokens: list[int], first: int) -> tuple[float, bool]:
    """Sum of log p(tokens[t] | the tokens before it) for t >= first, and whether each is the argmax.

    The model reads at most block_size tokens: tokens[first:] is taken in pieces of block_size, each
    read as the block_size tokens before the piece's end (the convention lm-eval's models and rolling
    windows follow)."""
    block, vocab = ref.model.config.block_size, ref.model.config.vocab_size
    total, greedy = 0.0, True
    with torch.no_grad():
        for a in range(first, len(tokens), block):
            b = min(a + block, len(tokens))
            start = max(0, b - 1 - block)
            row = tokens[start: b - 1]
            log_probs = torch.log_softmax(ref.model.logits(torch.tensor([row]))[0, :, :vocab], dim=-1)
            for t in range(a, b):
                lp = log_probs[t - 1 - start]
                total += lp[tokens[t]].item()
                greedy = greedy and int(lp.argmax()) == tokens[t]
    return total, greedy


def loglikelihood(ref: SimpleNamespace, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context): the pair tokenized as a whole, the context's tokens its prefix."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    return token_scores(ref, encode(ref, stripped + continuation), len(encode(ref, stripped)))


def examples(task: str, limit: int) -> list[dict]:
    lines = (TASKS / task / "test.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:limit]]


@pytest.fixture(scope="module")
def next_token_task(run: Path, reference: SimpleNamespace, tiny_data: Path,
                    tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """The README's recipe for a new task: a YAML and its JSON lines in any folder, named by path.

    Its targets are the next token of training text: half of them ones the model predicts greedily
    (found by the reference scoring), half not, so the greedy accuracy must be exactly one half. (The
    last word of WikiText is beyond this tiny model: its accuracy there is 0 for both.)"""
    from slm_cli.data.prepared import load_prepared

    tokens = torch.from_numpy(load_prepared(tiny_data / "tiny").tokens("train")[:40000].astype(np.int64))
    windows = tokens[: len(tokens) // 25 * 25].view(-1, 25)
    with torch.no_grad():  # where the model's argmax is the next token, in one batched pass
        argmax = reference.model.logits(windows[:, :24])[:, -1, : reference.model.config.vocab_size].argmax(-1)
    hits, misses, half = [], [], 8
    for window, predicted in zip(windows.tolist(), (argmax == windows[:, 24]).tolist(), strict=True):
        row = {"context": reference.tok.decode(window[:24]), "target": reference.tok.decode(window[24:])}
        if not row["context"].strip() or (not predicted and len(misses) >= half):
            continue
        # The task re-tokenizes its text: the reference scoring, not the window, says which it is.
        (hits if loglikelihood(reference, row["context"], row["target"])[1] else misses).append(row)
        if len(hits) >= half and len(misses) >= half:
            break
    assert len(hits) >= half, f"the model predicts too few tokens ({len(hits)}): train it longer"
    rows = [row for pair in zip(hits[:half], misses[:half], strict=True) for row in pair]
    folder = tmp_path_factory.mktemp("next_token")
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    yaml = (TASKS / "wikitext2_lastword" / "wikitext2_lastword.yaml").read_text()
    yaml = yaml.replace("task: wikitext2_lastword", "task: next_token").replace("test: test.jsonl", "test: data.jsonl")
    (folder / "next_token.yaml").write_text(yaml.replace("  - slm_local\n", "  - test_only\n"))
    return folder / "next_token.yaml", len(rows)


@pytest.fixture(scope="module")
def evaluated(run: Path, next_token_task: tuple[Path, int]) -> tuple[subprocess.CompletedProcess, dict]:
    """One `slm eval` of the two local tasks and a task named by its YAML's path."""
    proc = ok(slm("eval", f"ckpt_path={run}", f"tasks=wikitext2_lastword,shakespeare_nextline,{next_token_task[0]}",
                  f"limit={LIMIT}", "batch_size=7", cwd=run.parent, env=OFFLINE))
    out = run / "eval" / "wikitext2_lastword+shakespeare_nextline+next_token.json"
    assert f"results: {out}" in proc.stdout
    return proc, json.loads(out.read_text())


def test_local_tasks_match_slm_scoring(evaluated: tuple[subprocess.CompletedProcess, dict],
                                       reference: SimpleNamespace) -> None:
    proc, record = evaluated
    results = record["results"]
    assert record["n-samples"]["wikitext2_lastword"]["effective"] == LIMIT
    assert record["slm"]["step"] == 80
    # The table: one row per metric, the task named on its first.
    assert any(line.split()[:2] == ["shakespeare_nextline", "acc"] for line in proc.stdout.splitlines())

    scored = [loglikelihood(reference, e["context"], e["target"]) for e in examples("wikitext2_lastword", LIMIT)]
    lls = [ll for ll, _ in scored]
    assert results["wikitext2_lastword"]["acc,none"] == sum(g for _, g in scored) / LIMIT
    assert results["wikitext2_lastword"]["perplexity,none"] == pytest.approx(math.exp(-np.mean(lls)), rel=1e-4)

    acc = acc_norm = 0
    for e in examples("shakespeare_nextline", LIMIT):
        lls = np.array([loglikelihood(reference, e["context"], "\n" + c)[0] for c in e["choices"]])
        acc += int(np.argmax(lls)) == e["label"]
        acc_norm += int(np.argmax(lls / np.array([len(c) for c in e["choices"]]))) == e["label"]
    assert results["shakespeare_nextline"]["acc,none"] == acc / LIMIT
    assert results["shakespeare_nextline"]["acc_norm,none"] == acc_norm / LIMIT
    assert 0 < acc < LIMIT  # the model is neither hopeless nor perfect: the comparison can fail


def test_a_task_yaml_elsewhere_and_greedy_accuracy(evaluated: tuple[subprocess.CompletedProcess, dict],
                                                    next_token_task: tuple[Path, int]) -> None:
    _, record = evaluated
    assert record["n-samples"]["next_token"]["effective"] == next_token_task[1]
    assert record["results"]["next_token"]["acc,none"] == 0.5


def test_progress_in_a_log_is_plain_lines(evaluated: tuple[subprocess.CompletedProcess, dict]) -> None:
    """Output to pipes, as in a SLURM log: lm-eval's and `datasets`' bars stay silent (no carriage
    return) and slm's model writes plain lines, at most one per 30 s of a loop and one as it ends."""
    proc, _ = evaluated
    assert "\r" not in proc.stdout + proc.stderr
    lines = [text for text in proc.stderr.splitlines() if text.startswith("slm loglikelihood")]
    closing = [m for m in (re.fullmatch(r"slm loglikelihood  batch (\d+)/\1  100%  [\d.]+ batch/s  "
                                        r"elapsed ([\d.]+) (s|min)  done", text) for text in lines) if m]
    assert closing
    seconds = sum(float(m.group(2)) * (60 if m.group(3) == "min" else 1) for m in closing)
    assert len(lines) <= len(closing) + seconds // 30


def test_results_path(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from slm_cli.errors import SlmError
    from slm_cli.evaluate.harness import results_path

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    cfg = OmegaConf.create({"out": None})
    assert results_path(cfg, run / "checkpoints" / "step100.ckpt", ["a", "b"]) == run / "eval" / "a+b@step100.json"
    with pytest.raises(SlmError, match="not inside an slm run dir: pass out="):
        results_path(cfg, tmp_path / "loose.ckpt", ["a"])
    cfg.out = str(tmp_path / "r.json")
    assert results_path(cfg, tmp_path / "loose.ckpt", ["a"]) == tmp_path / "r.json"


def test_rolling_loglikelihood_and_generation(run: Path, reference: SimpleNamespace) -> None:
    from slm_cli.evaluate.harness import SlmLM

    lm = SlmLM(ckpt_path=str(run), batch_size=3, device="cpu")
    text = "def main(argv):\n    return [x for x in argv if x]\n" * 4  # several windows of 32 tokens
    (rolling,) = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))], disable_tqdm=True)
    tokens = encode(reference, text)
    assert len(tokens) > 2 * reference.model.config.block_size
    assert rolling == pytest.approx(token_scores(reference, [reference.eos, *tokens], 1)[0], rel=1e-5)

    # Greedy decoding: each new token is the argmax given the last block_size tokens, up to the stop.
    context = "import os\nimport sys\n\n\ndef "
    (generated,) = lm.generate_until([SimpleNamespace(args=(context, {"until": ["\n\n"], "max_gen_toks": 12}))],
                                     disable_tqdm=True)
    ids: list[int] = []
    with torch.no_grad():
        for _ in range(12):
            row = (encode(reference, context) + ids)[-reference.model.config.block_size:]
            token = int(reference.model.logits(torch.tensor([row]))[0, -1, : reference.model.config.vocab_size].argmax())
            if token == reference.eos:
                break
            ids.append(token)
            if "\n\n" in reference.tok.decode(ids):
                break
    assert generated == reference.tok.decode(ids).split("\n\n")[0]


def one_error_line(args: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> str:
    """`slm eval ARGS` run in this process (the CLI's own entry, without a new interpreter's start-up):
    it fails with one line on stderr and no traceback."""
    from slm_cli.__main__ import main

    monkeypatch.setattr(sys, "argv", ["slm", "eval", *args])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # main() sets it; monkeypatch puts it back afterwards
    assert main(["eval", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("slm eval: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_unknown_task_fails_in_one_line(run: Path, capsys: pytest.CaptureFixture,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    line = one_error_line([f"ckpt_path={run}", "tasks=wikitext2_lastwrd"], capsys, monkeypatch)
    assert "unknown task 'wikitext2_lastwrd'" in line and "did you mean wikitext2_lastword" in line


def test_missing_checkpoint_fails_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    line = one_error_line([f"ckpt_path={tmp_path / 'no.ckpt'}", "tasks=slm_local"], capsys, monkeypatch)
    assert f"checkpoint {tmp_path / 'no.ckpt'} does not exist" in line


def test_without_lm_eval_tasks_name_the_extra(run: Path, capsys: pytest.CaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails as if not installed
    monkeypatch.delitem(sys.modules, "slm_cli.evaluate.harness", raising=False)
    line = one_error_line([f"ckpt_path={run}", "tasks=slm_local"], capsys, monkeypatch)
    assert "pip install 'slm[eval]'" in line


def test_task_data_is_what_the_script_builds() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_eval_tasks.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for task in ("wikitext2_lastword", "shakespeare_nextline"):
        assert len(examples(task, 10**6)) == 300
