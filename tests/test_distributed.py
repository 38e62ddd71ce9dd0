"""Scale-out: results do not depend on how the global batch is split (devices, micro-batches).

Every run here trains on the same global batch of 4 windows per step, split four ways: one
process with batch 4; one process with 2 micro-batches of 2 (accumulation); DDP on 2 CPU
processes (gloo) with batch 2 each; FSDP2 on 2 CPU processes with batch 2 each.

- The default trainer.selection_scope=micro_batch selects within each micro-batch of 2 windows:
  for that micro-batch size, accumulation, DDP and FSDP2 must agree (parameters to float
  tolerance, counters exactly) and pay no scoring pass.
- trainer.selection_scope=global_batch selects over the whole global batch: every split must agree
  with the one-process run, and a micro-batch selection (DDP with batch 2) must not, which shows that
  the agreement comes from the global selection and not from a selection too weak to differ.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from slm_cli.flops import step_flops
from slm_cli.model.gpt import GPTConfig
from slm_cli.outputs import load_checkpoint
from tests.helpers import TINY_MODEL, ok, slm, train

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
GLOBAL = ["trainer.selection_scope=global_batch"]
# Splits with micro-batches of 2 windows: the default micro_batch scope is the same on all of them.
MICRO_SPLITS = ("accumulate", "ddp", "fsdp")


# Parameters of runs on different splits agree to SAME_SPLIT: the float32 sums run in another order
# (per micro-batch, per rank), and AdamW's m/√v turns that rounding into a step of up to lr on a
# weight whose exact gradient is 0 or nearly (the attention's key bias: softmax ignores it). Measured:
# 1.4e-5 at most after 4 steps at lr 3e-3, in isolated elements. A different selection moves the
# parameters by ~1e-2 (a micro-batch selection against the global one, below), a hundred times more.
SAME_SPLIT = 1e-4


def params(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model's parameters from the run's last checkpoint (a file, or a sharded folder)."""
    return load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def eslm_runs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ESLM on every split: global_batch scope (keys "one", "accumulate", "ddp", "fsdp") and the
    default micro_batch scope (keys "micro_<split>")."""
    root = tmp_path_factory.mktemp("splits")
    runs = {}
    for name, split in SPLITS.items():
        runs[name] = root / name
        train(runs[name], tiny_data, "selection=eslm", *GLOBAL, *COMMON, *split, cwd=root)
    for name in MICRO_SPLITS:
        runs[f"micro_{name}"] = root / f"micro_{name}"
        train(runs[f"micro_{name}"], tiny_data, "selection=eslm", *COMMON, *SPLITS[name], cwd=root)
    return runs


@pytest.mark.parametrize("split", ["accumulate", "ddp", "fsdp"])
def test_global_selection_gives_the_same_parameters_on_any_split(eslm_runs: dict[str, Path], split: str) -> None:
    reference = params(eslm_runs["one"])
    diff = max_diff(params(eslm_runs[split]), reference)
    assert diff < SAME_SPLIT, f"{split}: parameters differ from the one-process run by {diff}"
    one, other = summary(eslm_runs["one"]), summary(eslm_runs[split])
    # Counters are summed over ranks and micro-batches: the same integers as one process.
    for key in ("steps", "train_tokens", "selected_tokens", "flops_nominal", "flops_clm"):
        assert other[key] == one[key], key
    assert other["val_loss"] == pytest.approx(one["val_loss"], abs=1e-5)


def test_selected_count_is_the_global_ceil(eslm_runs: dict[str, Path]) -> None:
    """ESLM keeps ⌈(1−α)·M⌉ of the M = 4 windows × 32 tokens of each global batch."""
    one = summary(eslm_runs["one"])
    assert one["selected_tokens"] == 4 * math.ceil(0.6 * 4 * 32)
    assert one["train_tokens"] == 4 * 4 * 32


def test_scoring_pass_is_counted_in_realised_flops_only(eslm_runs: dict[str, Path]) -> None:
    """Global selection over 2 micro-batches scores them in one extra forward (F/3 per token)."""
    one, acc = summary(eslm_runs["one"]), summary(eslm_runs["accumulate"])
    per_token = one["flops_clm"] / one["train_tokens"]  # F
    assert acc["flops_nominal"] == one["flops_nominal"]
    assert acc["flops_realized"] == pytest.approx(one["flops_realized"] + one["train_tokens"] * per_token / 3,
                                                  rel=1e-12)


@pytest.mark.parametrize("split", ["ddp", "fsdp"])
def test_micro_batch_selection_is_the_same_on_any_split(eslm_runs: dict[str, Path], split: str) -> None:
    """The default scope: rank r's micro-batch holds the rows of micro-batch r of one process with
    accumulation, so the same tokens are selected and the update is the same; no scoring pass, so
    realised FLOPs with accumulation equal those of the split without it (DDP) and the formula's."""
    acc, other = eslm_runs["micro_accumulate"], eslm_runs[f"micro_{split}"]
    diff = max_diff(params(other), params(acc))
    assert diff < SAME_SPLIT, f"{split}: parameters differ from one process with accumulation by {diff}"
    a, b = summary(acc), summary(other)
    for key in ("steps", "train_tokens", "forward_tokens", "selected_tokens", "flops_nominal", "flops_realized",
                "flops_clm"):
        assert b[key] == a[key], key
    assert a["selected_tokens"] == 4 * 2 * math.ceil(0.6 * 2 * 32)  # per micro-batch of 2 windows
    cfg = GPTConfig(vocab_size=512, **{k.split(".")[1].split("=")[0]: int(k.split("=")[1]) for k in TINY_MODEL})
    assert a["flops_realized"] == step_flops(cfg, a["train_tokens"], a["selected_tokens"]).realized


def test_micro_batch_selection_differs_from_the_global_one(eslm_runs: dict[str, Path]) -> None:
    diff = max_diff(params(eslm_runs["micro_ddp"]), params(eslm_runs["one"]))
    assert diff > 10 * SAME_SPLIT, "a per-micro-batch selection should train on other tokens than the global one"
    local = summary(eslm_runs["micro_ddp"])
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


@pytest.mark.parametrize("scope", ["micro_batch", "global_batch"])
def test_ada_eslm_alpha_is_the_same_on_every_split(tiny_data: Path, tmp_path: Path, scope: str) -> None:
    """Ada-ESLM adapts α once per step from the whole global batch, so with micro-batches of 2
    windows, DDP and FSDP2 end with the α, counters and weights of one process with accumulation
    (micro_batch scope), and DDP with those of one process on the whole batch (global_batch)."""
    common = ["selection=ada_eslm", "selection.momentum=0.5", f"trainer.selection_scope={scope}", *COMMON]
    splits = ("accumulate", "ddp", "fsdp") if scope == "micro_batch" else ("one", "ddp")
    for split in splits:
        train(tmp_path / split, tiny_data, *common, *SPLITS[split], cwd=tmp_path)
    first, *others = (load_checkpoint(tmp_path / n / "checkpoints" / "last.ckpt") for n in splits)
    alpha = first["slm"]["selection"]["state"]["alpha"]
    assert alpha != 0.5  # it moved
    for name, other in zip(splits[1:], others, strict=True):
        assert other["slm"]["selection"]["state"]["alpha"] == pytest.approx(alpha, abs=1e-12), name
        assert other["slm"]["counters"] == first["slm"]["counters"], name
        assert max_diff(first["state_dict"], other["state_dict"]) < SAME_SPLIT, name


def test_fsdp_sharded_checkpoint_resumes_exactly_and_evaluates(eslm_runs: dict[str, Path], tiny_data: Path,
                                                              tmp_path: Path) -> None:
    """FSDP: 2 steps, then resume from the sharded last.ckpt to 4 == 4 steps in one go; `slm eval`
    reads the sharded folder and reproduces the run's validation loss."""
    args = ["selection=eslm", *GLOBAL, *COMMON, *SPLITS["fsdp"]]
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
            train(runs[strategy, split], tiny_data, *overrides, *extra, *GLOBAL, *COMMON, *SPLITS[split], cwd=root)
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
    clm = train(tmp_path / "clm", tiny_data, "selection=clm", *GLOBAL, *COMMON, *SPLITS["accumulate"], cwd=tmp_path)
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


# ---- instance-level selection (hierarchical ESLM): the same windows and tokens on any split --------
@pytest.fixture(scope="module")
def hier_runs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hier")
    runs = {}
    for split in MICRO_SPLITS:
        runs[split] = root / split
        train(runs[split], tiny_data, "selection=hier_eslm", "selection.score_positions=8", *COMMON, *SPLITS[split],
              cwd=root)
    return runs


@pytest.mark.parametrize("split", ["ddp", "fsdp"])
def test_instance_selection_is_the_same_on_any_split(hier_runs: dict[str, Path], split: str) -> None:
    """Each micro-batch of 2 windows keeps 1 by its early-exit score and trains ESLM on its tokens:
    DDP and FSDP2 (whose early exit runs through the sharded model) give one process's update."""
    diff = max_diff(params(hier_runs[split]), params(hier_runs["accumulate"]))
    assert diff < SAME_SPLIT, f"{split}: parameters differ from one process with accumulation by {diff}"
    a, b = summary(hier_runs["accumulate"]), summary(hier_runs[split])
    for key in ("train_tokens", "forward_tokens", "selected_tokens", "flops_nominal", "flops_realized", "flops_clm"):
        assert b[key] == a[key], key
    assert (a["train_tokens"], a["forward_tokens"]) == (4 * 4 * 32, 4 * 2 * 32)  # half the windows run
    assert a["selected_tokens"] == 4 * 2 * math.ceil(0.6 * 32)
