"""Scale-out: results do not depend on how the global batch is split (devices, micro-batches).

Every run here trains on the same global batch of 4 windows per step, split four ways: one
process with batch 4; one process with 2 micro-batches of 2 (accumulation); DDP on 2 CPU
processes (gloo) with batch 2 each; FSDP2 on 2 CPU processes with batch 2 each. With
selection.scope=global the parameters must agree to float tolerance (the references are the
one-process run and, for the counters, exact integer counts); scope=local must not, which shows
that the agreement comes from the global selection and not from a selection too weak to differ.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from slm_cli.outputs import load_checkpoint
from tests.helpers import ok, slm, train

pytestmark = pytest.mark.slow

CPU_DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=2"]
CPU_FSDP = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=2"]
COMMON = ["trainer.max_steps=4", "trainer.val_check_interval=2", "optim.warmup_steps=1", "optim.lr=3e-3"]
SPLITS = {  # global batch 4 windows per step in every case
    "one": ["data.batch_size=4"],
    "accumulate": ["data.batch_size=2", "trainer.accumulate_grad_batches=2"],
    "ddp": ["data.batch_size=2", *CPU_DDP],
    "fsdp": ["data.batch_size=2", *CPU_FSDP],
}


# Parameters of runs on different splits agree to SAME_SPLIT: the float32 sums run in another order
# (per micro-batch, per rank), and AdamW's m/√v turns that rounding into a step of up to lr on a
# weight whose exact gradient is 0 or nearly (the attention's key bias: softmax ignores it). Measured:
# 1.4e-5 at most after 4 steps at lr 3e-3, in isolated elements. A different selection moves the
# parameters by ~1e-2 (scope=local below), a hundred times more.
SAME_SPLIT = 1e-4


def params(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model's parameters from the run's last checkpoint (a file, or a sharded folder)."""
    return load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def eslm_runs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("splits")
    runs = {}
    for name, split in SPLITS.items():
        runs[name] = root / name
        train(runs[name], tiny_data, "selection=eslm", *COMMON, *split, cwd=root)
    runs["ddp_local"] = root / "ddp_local"
    train(runs["ddp_local"], tiny_data, "selection=eslm", "selection.scope=local", *COMMON, *SPLITS["ddp"], cwd=root)
    return runs


@pytest.mark.parametrize("split", ["accumulate", "ddp", "fsdp"])
def test_global_selection_gives_the_same_parameters_on_any_split(eslm_runs: dict[str, Path], split: str) -> None:
    reference = params(eslm_runs["one"])
    diff = max_diff(params(eslm_runs[split]), reference)
    assert diff < SAME_SPLIT, f"{split}: parameters differ from the one-process run by {diff}"
    one = json.loads((eslm_runs["one"] / "summary.json").read_text())
    other = json.loads((eslm_runs[split] / "summary.json").read_text())
    # Counters are summed over ranks and micro-batches: the same integers as one process.
    for key in ("steps", "train_tokens", "selected_tokens", "flops_nominal", "flops_clm"):
        assert other[key] == one[key], key
    assert other["val_loss"] == pytest.approx(one["val_loss"], abs=1e-5)


def test_selected_count_is_the_global_ceil(eslm_runs: dict[str, Path]) -> None:
    """ESLM keeps ⌈(1−α)·M⌉ of the M = 4 windows × 32 tokens of each global batch."""
    one = json.loads((eslm_runs["one"] / "summary.json").read_text())
    assert one["selected_tokens"] == 4 * math.ceil(0.6 * 4 * 32)
    assert one["train_tokens"] == 4 * 4 * 32


def test_scoring_pass_is_counted_in_realised_flops_only(eslm_runs: dict[str, Path]) -> None:
    """Global selection over 2 micro-batches scores them in one extra forward (F/3 per token)."""
    one = json.loads((eslm_runs["one"] / "summary.json").read_text())
    acc = json.loads((eslm_runs["accumulate"] / "summary.json").read_text())
    per_token = one["flops_clm"] / one["train_tokens"]  # F
    assert acc["flops_nominal"] == one["flops_nominal"]
    assert acc["flops_realized"] == pytest.approx(one["flops_realized"] + one["train_tokens"] * per_token / 3, rel=1e-12)


def test_local_scope_selects_per_device(eslm_runs: dict[str, Path]) -> None:
    diff = max_diff(params(eslm_runs["ddp_local"]), params(eslm_runs["one"]))
    assert diff > 10 * SAME_SPLIT, "scope=local should train on other tokens than one selection over the global batch"
    local = json.loads((eslm_runs["ddp_local"] / "summary.json").read_text())
    assert local["selected_tokens"] == 4 * 2 * math.ceil(0.6 * 2 * 32)  # per device


def test_only_rank_zero_writes(eslm_runs: dict[str, Path]) -> None:
    """Rank 1 logs to its own file in the same run dir and writes nothing else; no second run dir."""
    for name in ("ddp", "fsdp"):
        run = eslm_runs[name]
        files = sorted(p.name for p in run.iterdir())
        assert files == [".hydra", "checkpoints", "metrics.csv", "summary.json", "train.log",
                         "train_ddp_process_1.log"], files
        assert not (run.parent / "outputs").exists()
    shards = eslm_runs["fsdp"] / "checkpoints" / "last.ckpt"
    assert shards.is_dir() and (shards / "meta.pt").is_file() and len(list(shards.glob("*.distcp"))) == 2


def test_ada_eslm_alpha_is_the_same_on_every_split(tiny_data: Path, tmp_path: Path) -> None:
    """Ada-ESLM adapts α from the whole global batch, so DDP ends with one-process α and weights."""
    common = ["selection=ada_eslm", "selection.momentum=0.5", *COMMON]
    train(tmp_path / "one", tiny_data, *common, *SPLITS["one"], cwd=tmp_path)
    train(tmp_path / "ddp", tiny_data, *common, *SPLITS["ddp"], cwd=tmp_path)
    a, b = (load_checkpoint(tmp_path / n / "checkpoints" / "last.ckpt") for n in ("one", "ddp"))
    assert a["slm"]["selection"]["state"]["alpha"] != 0.5  # it moved
    assert b["slm"]["selection"]["state"]["alpha"] == pytest.approx(a["slm"]["selection"]["state"]["alpha"], abs=1e-12)
    assert max_diff(a["state_dict"], b["state_dict"]) < SAME_SPLIT


def test_fsdp_sharded_checkpoint_resumes_exactly_and_evaluates(eslm_runs: dict[str, Path], tiny_data: Path,
                                                              tmp_path: Path) -> None:
    """FSDP: 2 steps, then resume from the sharded last.ckpt to 4 == 4 steps in one go; `slm eval`
    reads the sharded folder and reproduces the run's validation loss."""
    args = ["selection=eslm", *COMMON, *SPLITS["fsdp"]]
    train(tmp_path / "half", tiny_data, *[a for a in args if a != "trainer.max_steps=4"], "trainer.max_steps=2",
          "optim.decay_steps=4", cwd=tmp_path)
    resumed = train(tmp_path / "resumed", tiny_data, *args, f"ckpt_path={tmp_path}/half/checkpoints/last.ckpt",
                    cwd=tmp_path)
    whole = json.loads((eslm_runs["fsdp"] / "summary.json").read_text())
    assert resumed["steps"] == 4 and resumed["train_tokens"] == whole["train_tokens"]
    assert max_diff(params(tmp_path / "resumed"), params(eslm_runs["fsdp"])) < 1e-6
    out = tmp_path / "eval.json"
    ok(slm("eval", f"ckpt_path={eslm_runs['fsdp']}/checkpoints/last.ckpt", f"paths.data_dir={tiny_data}",
           "data.name=tiny", "data.max_bytes=300000", "data.vocab_size=512", "data.batch_size=4", "max_batches=4",
           f"out={out}", cwd=tmp_path))
    assert json.loads(out.read_text())["loss"] == pytest.approx(whole["val_loss"], abs=1e-5)


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile on CPU needs a C compiler")
def test_compiled_blocks_train_the_same_model(eslm_runs: dict[str, Path], tiny_data: Path, tmp_path: Path) -> None:
    """trainer.compile=true (torch.compile per block, as on GPUs) changes neither the result nor
    the checkpoint's parameter names."""
    train(tmp_path / "compiled", tiny_data, "selection=eslm", "trainer.compile=true", *COMMON, *SPLITS["one"],
          cwd=tmp_path)
    assert max_diff(params(tmp_path / "compiled"), params(eslm_runs["one"])) < 1e-5


# ---- every strategy, not only ESLM: random (no model features) and rho1 (reference features) ----
STRATEGIES = {
    "random": ["selection=random"],
    # online RHO-1 with the one-process ESLM run as its reference (the same tokenizer as the data)
    "rho1": ["selection=rho1", "selection.reference.mode=online"],
}


@pytest.fixture(scope="module")
def strategy_runs(eslm_runs: dict[str, Path], tiny_data: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("strategies")
    reference = eslm_runs["one"] / "checkpoints" / "last.ckpt"
    runs = {}
    for strategy, overrides in STRATEGIES.items():
        extra = [f"selection.reference.ckpt_path={reference}"] if strategy == "rho1" else []
        for split in ("one", "accumulate", "ddp"):
            runs[strategy, split] = root / f"{strategy}_{split}"
            train(runs[strategy, split], tiny_data, *overrides, *extra, *COMMON, *SPLITS[split], cwd=root)
    return runs


@pytest.mark.parametrize("split", ["accumulate", "ddp"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_strategy_is_the_same_on_any_split(strategy_runs: dict[tuple[str, str], Path], strategy: str,
                                                 split: str) -> None:
    one, other = strategy_runs[strategy, "one"], strategy_runs[strategy, split]
    diff = max_diff(params(other), params(one))
    assert diff < SAME_SPLIT, f"{strategy} {split}: parameters differ from the one-process run by {diff}"
    a, b = (json.loads((run / "summary.json").read_text()) for run in (one, other))
    assert (b["selected_tokens"], b["flops_nominal"]) == (a["selected_tokens"], a["flops_nominal"])


def test_strategies_that_do_not_read_the_model_pay_no_scoring_pass(
        strategy_runs: dict[tuple[str, str], Path], tiny_data: Path, tmp_path: Path) -> None:
    """CLM and random select from the batch alone: with accumulation under global scope their
    realised FLOPs are those of one process (for CLM: equal to CLM's, nothing saved, nothing
    added), while ESLM, which reads the model, pays its scoring pass (see above)."""
    clm = train(tmp_path / "clm", tiny_data, "selection=clm", *COMMON, *SPLITS["accumulate"], cwd=tmp_path)
    assert clm["flops_realized"] == clm["flops_clm"] == clm["flops_nominal"]
    assert clm["flops_saved_frac_realized"] == 0.0
    one, acc = (json.loads((strategy_runs["random", s] / "summary.json").read_text()) for s in ("one", "accumulate"))
    assert acc["flops_realized"] == one["flops_realized"] < one["flops_clm"]


def test_bf16_autocast_trains_like_float32(eslm_runs: dict[str, Path], tiny_data: Path, tmp_path: Path) -> None:
    """trainer.precision=bf16-mixed (what trainer=gpu uses; CPU autocast takes the same code path
    through the custom head backward) with ESLM selection: the same counts, and a validation loss
    within 0.05 nats of float32 after 4 steps (stated tolerance: bf16 rounds each matmul to 8 bits
    of mantissa, and a different rounding can change which tokens are selected)."""
    bf16 = train(tmp_path / "bf16", tiny_data, "selection=eslm", "trainer.precision=bf16-mixed", *COMMON,
                 *SPLITS["one"], cwd=tmp_path)
    fp32 = json.loads((eslm_runs["one"] / "summary.json").read_text())
    assert (bf16["train_tokens"], bf16["selected_tokens"]) == (fp32["train_tokens"], fp32["selected_tokens"])
    assert bf16["val_loss"] == pytest.approx(fp32["val_loss"], abs=0.05)
    assert bf16["val_loss"] != fp32["val_loss"]  # bf16 really ran
