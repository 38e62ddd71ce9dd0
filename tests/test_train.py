"""End-to-end `slm train` / `slm eval` on a tiny model: outputs, accounting, resume, evaluation."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from slm_cli.summary import RunSummary
from tests.helpers import QUIET, TINY_DATA, TINY_MODEL, ok, slm, train


def analytic_flops_per_token(state: dict, n_layer: int, block_size: int, n_embd: int) -> int:
    """6N + 12·L·T·d with N counted from the checkpoint's tensors: every 2-D weight of the blocks
    plus the (tied) head once; position embeddings, biases and LayerNorms excluded."""
    n = sum(v.numel() for k, v in state.items() if ".h." in k and v.dim() == 2)
    n += state["model.lm_head.weight"].numel()
    return 6 * n + 12 * n_layer * block_size * n_embd


@pytest.fixture(scope="module")
def run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "clm"
    train(run_dir, tiny_data, "trainer.max_steps=200", "trainer.val_check_interval=100", "optim.lr=3e-3",
          "data.batch_size=8",
          "trainer.checkpoint_every_n_steps=100", "optim.warmup_steps=10", cwd=run_dir.parent)
    return run_dir


def test_run_outputs(run: Path) -> None:
    assert (run / ".hydra" / "config.yaml").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "checkpoints" / "step0000100.ckpt").is_file()
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"step", "train/loss", "train/loss_all", "val/loss", "val/ppl", "lr"} <= set(rows[0])
    val = [float(r["val/loss"]) for r in rows if r["val/loss"]]
    assert len(val) == 2  # at steps 100 and 200
    summary = json.loads((run / "summary.json").read_text())
    # one key per figure of the schema (slm_cli/summary.py), every one filled
    assert list(summary) == [f.name for f in dataclasses.fields(RunSummary)]
    assert all(value is not None for value in summary.values())
    for key in ("steps", "train_tokens", "selected_tokens", "val_loss", "val_ppl", "flops_realized",
                "flops_clm", "flops_saved_frac_nominal", "train_tokens_per_s", "wall_s"):
        assert key in summary, key
    assert summary["val_loss"] == pytest.approx(val[-1], rel=1e-6)
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]), rel=1e-9)
    assert not list(run.rglob("*.tmp"))


def test_accounting_matches_analytic_formula(run: Path) -> None:
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 200
    assert summary["train_tokens"] == 200 * 8 * 32  # steps × batch × context
    assert summary["selected_tokens"] == summary["train_tokens"]  # CLM trains on every token
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    per_token = analytic_flops_per_token(state, n_layer=2, block_size=32, n_embd=64)
    assert summary["flops_clm"] == summary["train_tokens"] * per_token
    assert summary["flops_realized"] == summary["flops_clm"]
    assert summary["flops_saved_frac_nominal"] == 0.0 and summary["flops_saved_frac_realized"] == 0.0


def test_model_learns(run: Path) -> None:
    """Validation loss ends below ln V (an untrained model) and below the unigram entropy of the
    training tokens (the best any context-free model can do), so the model uses its context."""
    summary = json.loads((run / "summary.json").read_text())
    meta = json.loads((Path(summary["data"]) / "meta.json").read_text())
    tokens = np.fromfile(Path(summary["data"]) / "train.bin", dtype=meta["dtype"])
    p = np.bincount(tokens) / len(tokens)
    unigram_entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    assert summary["val_loss"] < math.log(meta["vocab_size"]) - 1.0
    assert summary["val_loss"] < unigram_entropy - 0.2


def test_checkpoint_is_weights_only_and_self_contained(run: Path) -> None:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    slm_state = ckpt["slm"]
    assert slm_state["model"]["n_layer"] == 2
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(slm_state["tokenizer_json"])
    prepared = Tokenizer.from_file(str(Path(json.loads((run / "summary.json").read_text())["data"]) / "tokenizer.json"))
    assert tok.to_str() == prepared.to_str()


def test_eval_reproduces_validation_loss(run: Path, tiny_data: Path) -> None:
    """`slm eval` (a plain torch loop) on the same windows gives the training run's val loss."""
    out = run.parent / "eval.json"
    ok(slm("eval", f"ckpt_path={run}/checkpoints/last.ckpt", f"paths.data_dir={tiny_data}", *TINY_DATA,
           "data.batch_size=8", "max_batches=4", f"out={out}", cwd=run.parent))
    result = json.loads(out.read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert result["tokens"] == 4 * 8 * 32
    assert result["loss"] == pytest.approx(summary["val_loss"], abs=1e-5)
    assert result["data"] == summary["data"]  # same tokenizer, so the prepared folder is reused


STRATEGIES = {
    "clm": [],
    "random": ["selection=random", "selection.ratio=0.5"],
    "eslm_entropy": ["selection=eslm", "selection.score=entropy", "selection.alpha=0.5"],
    "ada_eslm": ["selection=ada_eslm"],
    "rho1_online": ["selection=rho1", "selection.reference.mode=online"],
    "hier_eslm": ["selection=hier_eslm", "selection.score_positions=8"],
    # a warm start: CLM for 15 steps, then ESLM; the resume at step 10 crosses the start step
    "eslm_warm_start": ["selection=eslm", "trainer.selection_start_step=15"],
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_resume_is_exact(strategy: str, run: Path, tiny_data: Path, tmp_path: Path) -> None:
    """20 steps in one go == 10 steps, then resume from last.ckpt to 20, for every strategy
    (data order, RNG state, LR schedule, counters and strategy state such as Ada-ESLM's alpha)."""
    common = ["optim.decay_steps=20", "optim.warmup_steps=4", "trainer.val_check_interval=10",
              "trainer.checkpoint_every_n_steps=5", *STRATEGIES[strategy]]
    if strategy == "rho1_online":  # the module's CLM run serves as the reference (same tokenizer)
        common.append(f"selection.reference.ckpt_path={run}/checkpoints/last.ckpt")
    whole = train(tmp_path / "whole", tiny_data, "trainer.max_steps=20", *common, cwd=tmp_path)
    train(tmp_path / "half", tiny_data, "trainer.max_steps=10", *common, cwd=tmp_path)
    resumed = train(tmp_path / "resumed", tiny_data, "trainer.max_steps=20",
                    f"ckpt_path={tmp_path}/half/checkpoints/last.ckpt", *common, cwd=tmp_path)
    assert resumed["steps"] == 20
    assert abs(resumed["val_loss"] - whole["val_loss"]) < 1e-6
    for key in ("train_tokens", "selected_tokens", "flops_realized", "flops_nominal", "flops_clm"):
        assert resumed[key] == whole[key], key
    a = torch.load(tmp_path / "whole/checkpoints/last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "resumed/checkpoints/last.ckpt", weights_only=True)
    assert a["slm"]["selection"] == b["slm"]["selection"]
    if strategy == "eslm_warm_start":  # every token for 15 steps, then ⌈0.6·M⌉ of the M = 4·32 per step
        assert whole["selected_tokens"] == 15 * 128 + 5 * math.ceil(0.6 * 128)
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=0, atol=1e-6)


def test_restarted_run_resumes_from_its_own_last_ckpt(tiny_data: Path, tmp_path: Path) -> None:
    """A job started again in its run dir (a requeued SLURM job) continues from checkpoints/last.ckpt
    without ckpt_path, ends like an uninterrupted run, and keeps the metrics rows logged before."""
    common = ["optim.decay_steps=8", "optim.warmup_steps=2", "trainer.val_check_interval=4",
              "trainer.checkpoint_every_n_steps=4", "trainer.log_every_n_steps=1"]
    whole = train(tmp_path / "whole", tiny_data, "trainer.max_steps=8", *common, cwd=tmp_path)
    train(tmp_path / "again", tiny_data, "trainer.max_steps=4", *common, cwd=tmp_path)
    first = (tmp_path / "again" / "metrics.csv").read_text().splitlines()
    proc = ok(slm("train", f"hydra.run.dir={tmp_path / 'again'}", f"paths.data_dir={tiny_data}", *TINY_DATA,
                  *TINY_MODEL, *QUIET, "trainer.max_steps=8", *common, cwd=tmp_path))
    assert f"resuming from {tmp_path / 'again'}/checkpoints/last.ckpt" in proc.stdout + proc.stderr
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert again["steps"] == 8 and again["train_tokens"] == whole["train_tokens"]
    assert abs(again["val_loss"] - whole["val_loss"]) < 1e-6
    rows = list(csv.DictReader((tmp_path / "again" / "metrics.csv").read_text().splitlines()))
    losses = {float(r["step"]): float(r["train/loss"]) for r in rows if r["train/loss"]}
    before = {float(r["step"]): float(r["train/loss"]) for r in csv.DictReader(first) if r["train/loss"]}
    assert sorted(before) == [0, 1, 2, 3] and all(losses[k] == v for k, v in before.items())  # kept
    assert sorted(losses) == list(range(8))  # and continued: one row per step, none skipped
    # The same command once more (a resubmitted sweep): the finished run is kept as it is, not
    # resumed for no step and its summary overwritten by a process that trained nothing.
    files = {name: (tmp_path / "again" / name).read_bytes()
             for name in ("summary.json", "metrics.csv", "checkpoints/last.ckpt")}
    proc = ok(slm("train", f"hydra.run.dir={tmp_path / 'again'}", f"paths.data_dir={tiny_data}", *TINY_DATA,
                  *TINY_MODEL, *QUIET, "trainer.max_steps=8", *common, cwd=tmp_path))
    assert f"run: {tmp_path / 'again'} finished before (step 8 of max_steps 8): summary.json kept" in proc.stdout
    assert "resuming from" not in proc.stdout + proc.stderr
    assert {name: (tmp_path / "again" / name).read_bytes() for name in files} == files


@pytest.mark.parametrize("everything", [["selection=eslm", "selection.alpha=1e-9"],
                                        ["selection=random", "selection.ratio=0.999999999"]])
def test_selecting_everything_is_clm_bit_for_bit(everything: list[str], tiny_data: Path, tmp_path: Path) -> None:
    common = ["trainer.max_steps=6", "trainer.val_check_interval=6"]
    clm = train(tmp_path / "clm", tiny_data, *common, cwd=tmp_path)
    other = train(tmp_path / "other", tiny_data, *common, *everything, cwd=tmp_path)
    assert other["selected_tokens"] == other["train_tokens"]
    assert other["val_loss"] == clm["val_loss"]
    a = torch.load(tmp_path / "clm/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "other/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_prepare_is_a_no_op_the_second_time(tiny_data: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in (tiny_data / "tiny").iterdir()}
    ok(slm("prepare", f"paths.data_dir={tiny_data}", *TINY_DATA, cwd=tiny_data))
    after = {p.name: p.stat().st_mtime_ns for p in (tiny_data / "tiny").iterdir()}
    assert before == after


@pytest.mark.parametrize(("first", "then"), [("clm", "ada_eslm"), ("ada_eslm", "eslm")])
def test_resuming_with_another_strategy(first: str, then: str, tiny_data: Path, tmp_path: Path) -> None:
    """A curriculum (CLM warm-up, then selection) resumes with the new strategy: its state starts
    from its config, the old strategy's state is dropped, and one log line says so."""
    train(tmp_path / "a", tiny_data, f"selection={first}", "trainer.max_steps=2", "trainer.val_check_interval=2",
          cwd=tmp_path)
    summary = train(tmp_path / "b", tiny_data, f"selection={then}", "trainer.max_steps=4",
                    "trainer.val_check_interval=2", f"ckpt_path={tmp_path}/a/checkpoints/last.ckpt", cwd=tmp_path)
    assert summary["steps"] == 4 and summary["selection"] == then
    log = (tmp_path / "b" / "train.log").read_text()
    assert f"resuming a selection={first} checkpoint with selection={then}" in log
    ckpt = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)
    if then == "ada_eslm":  # started at its configured alpha 0.5, then adapted for 2 steps
        assert ckpt["slm"]["selection"]["state"]["alpha"] != 0.5
    assert ckpt["slm"]["selection"]["name"] == then


def test_a_baseline_trains_on_the_grid_rho1_uses(tiny_data: Path) -> None:
    """data.window_grid puts CLM's (or random's) windows where RHO-1's precomputed scores put RHO-1's:
    starts on multiples of the grid; a strategy with a grid of its own refuses another one."""
    from slm_cli.data.prepared import load_prepared
    from slm_cli.data.windows import TrainWindows
    from slm_cli.errors import SlmError
    from slm_cli.run import window_grid
    from slm_cli.selection.clm import CLM

    class Gridded(CLM):
        def window_grid(self, block_size: int) -> int:
            return 64

    assert window_grid(CLM(), None, 32) is None and window_grid(CLM(), 32, 32) == 32
    assert window_grid(Gridded(), None, 32) == window_grid(Gridded(), 64, 32) == 64
    with pytest.raises(SlmError, match="data.window_grid=32 but selection=clm trains on the grid of its scores"):
        window_grid(Gridded(), 32, 32)
    tokens = load_prepared(tiny_data / "tiny").tokens("train")
    starts = TrainWindows(tokens, 32, seed=3, grid=window_grid(CLM(), 32, 32))[np.arange(64)]["positions"][:, 0] - 1
    assert (starts % 32 == 0).all() and len(set(starts.tolist())) > 32  # on the grid, and spread over it
