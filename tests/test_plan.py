"""The plan before a run: budgets (global batch, token budget), `dry_run=true`, the memory estimate
against a measured peak, the up-front memory check, `auto` hardware, and Lightning pass-through."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from slm_cli.model.gpt import GPT, GPTConfig
from tests.helpers import QUIET, TINY_DATA, TINY_MODEL, ok, slm, train


def dry(tmp_path: Path, data: Path, *overrides: str) -> dict:
    out = tmp_path / "plan.json"
    proc = ok(slm("train", "dry_run=true", f"plan_out={out}", f"paths.data_dir={data}", *TINY_DATA, *TINY_MODEL,
                  f"hydra.run.dir={tmp_path}/run", *overrides, cwd=tmp_path))
    assert not (tmp_path / "run").exists()  # a plan leaves no run dir
    assert "memory      per device" in proc.stdout and "ETA" in proc.stdout
    return {**json.loads(out.read_text()), "log": proc.stdout + proc.stderr}


def test_dry_run_reports_the_budget(tiny_data: Path, tmp_path: Path) -> None:
    plan = dry(tmp_path, tiny_data, "trainer.max_steps=7")
    with __import__("torch").device("meta"):
        params = GPT(GPTConfig(block_size=32, vocab_size=512, n_layer=2, n_head=2, n_embd=64)).num_params(False)
    assert plan["params"] == params and plan["vocab_size"] == 512  # from the prepared folder's meta.json
    assert (plan["global_batch"], plan["tokens_per_step"], plan["steps"]) == (4, 4 * 32, 7)
    assert plan["total_tokens"] == 7 * 4 * 32
    assert plan["flops_realized"] == pytest.approx(7 * plan["flops_per_step_realized"])


def test_global_batch_and_token_budget(tiny_data: Path, tmp_path: Path) -> None:
    """data.global_batch_size fixes the windows per step whatever the devices: accumulation is
    derived (8 windows / (2 × 1 device) = 4; / (2 × 4 devices) = 1); trainer.max_tokens sets the steps."""
    plan = dry(tmp_path, tiny_data, "data.global_batch_size=8", "data.batch_size=2", "trainer.max_tokens=1000")
    assert (plan["accumulate"], plan["global_batch"], plan["steps"]) == (4, 8, math.ceil(1000 / (8 * 32)))
    plan = dry(tmp_path, tiny_data, "data.global_batch_size=8", "data.batch_size=2", "trainer=ddp",
               "trainer.devices=4")
    assert (plan["accumulate"], plan["world_size"], plan["global_batch"]) == (1, 4, 8)
    # trainer=ddp on a CPU-only machine picks the CPU and 32-true by itself, and says so
    assert "accelerator=cpu precision=32-true (auto" in plan["log"]
    proc = slm("train", "dry_run=true", f"paths.data_dir={tiny_data}", *TINY_DATA, *TINY_MODEL,
               "data.global_batch_size=10", "data.batch_size=4", cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(
        "slm train: error: data.global_batch_size=10 is not a multiple of data.batch_size × devices × nodes = 4")


def test_a_run_that_cannot_fit_stops_up_front(tmp_path: Path) -> None:
    """`slm train model.block_size=100000` used to grow for minutes; now it stops before preparing
    any data, in one line naming the estimate and the knobs."""
    proc = slm("train", "model.block_size=100000", f"paths.data_dir={tmp_path}/data", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "GiB per device" in last and "data.batch_size" in last and "trainer.check_memory=false" in last
    assert not (tmp_path / "data").exists()


MEASURED = [*TINY_DATA, "data.batch_size=8", "model.block_size=256", "model.n_layer=4", "model.n_head=8",
            "model.n_embd=512", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
            "trainer.enable_progress_bar=false"]


@pytest.mark.slow
def test_memory_estimate_is_within_a_quarter_of_the_measured_peak(tiny_data: Path, tmp_path: Path) -> None:
    """A CPU run whose model, optimizer and activations outweigh the runtime: the dry run's estimate
    against the peak resident memory of the real run (getrusage of the child, in a fresh parent)."""
    out = tmp_path / "plan.json"
    ok(slm("train", "dry_run=true", f"plan_out={out}", f"paths.data_dir={tiny_data}", *MEASURED, cwd=tmp_path))
    estimate = json.loads(out.read_text())["memory_total"]
    measure = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)")
    proc = subprocess.run([sys.executable, "-c", measure, sys.executable, "-m", "slm_cli", "train",
                           f"paths.data_dir={tiny_data}", f"hydra.run.dir={tmp_path}/run", *MEASURED],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = float(proc.stdout.strip().splitlines()[-1])
    assert abs(estimate - peak) <= 0.25 * peak, f"estimate {estimate / 2**30:.2f} GiB, peak {peak / 2**30:.2f} GiB"


def test_lightning_arguments_pass_through(tiny_data: Path, tmp_path: Path) -> None:
    """`+trainer.profiler=simple` reaches lightning.Trainer (its report is printed); an unknown key
    and a key slm sets itself are one line each."""
    proc = ok(slm("train", f"hydra.run.dir={tmp_path}/run", f"paths.data_dir={tiny_data}", *TINY_DATA, *TINY_MODEL,
                  *QUIET, "trainer.max_steps=2", "trainer.val_check_interval=2", "+trainer.profiler=simple",
                  cwd=tmp_path))
    assert "Profiler Report" in proc.stdout + proc.stderr + (tmp_path / "run" / "train.log").read_text()
    for key, words in (("+trainer.bogus=1", "trainer.bogus is neither an slm key nor a lightning.Trainer argument"),
                       ("+trainer.max_epochs=3", "trainer.max_epochs is set by slm itself")):
        bad = slm("train", f"hydra.run.dir={tmp_path}/bad", f"paths.data_dir={tiny_data}", *TINY_DATA, *TINY_MODEL,
                  key, cwd=tmp_path)
        assert bad.returncode == 1 and words in bad.stderr.strip().splitlines()[-1], bad.stderr[-500:]


def test_accumulation_and_global_batch_train_alike(tiny_data: Path, tmp_path: Path) -> None:
    """data.global_batch_size=4 with data.batch_size=2 is trainer.accumulate_grad_batches=2."""
    a = train(tmp_path / "a", tiny_data, "data.global_batch_size=4", "data.batch_size=2", "trainer.max_steps=2",
              "trainer.val_check_interval=2", cwd=tmp_path)
    b = train(tmp_path / "b", tiny_data, "trainer.accumulate_grad_batches=2", "data.batch_size=2",
              "trainer.max_steps=2", "trainer.val_check_interval=2", cwd=tmp_path)
    assert a["val_loss"] == b["val_loss"] and a["train_tokens"] == b["train_tokens"] == 2 * 4 * 32


SHAPES = {  # the same shape planned and trained: every selection path, with accumulation
    "eslm": ["selection=eslm", "data.batch_size=2", "trainer.accumulate_grad_batches=2"],
    "hier_eslm": ["selection=hier_eslm", "selection.score_positions=8", "data.batch_size=2",
                  "trainer.accumulate_grad_batches=2"],
    "eslm_global": ["selection=eslm", "trainer.selection_scope=global_batch", "data.batch_size=2",
                    "trainer.accumulate_grad_batches=2"],
    "random": ["selection=random", "selection.ratio=0.3"],
    "hier_eslm_warm_start": ["selection=hier_eslm", "selection.score_positions=8", "trainer.selection_start_step=2"],
    "rho1_reference_loss_global": ["selection=rho1", "selection.score=reference_loss", "selection.reference.mode=online",
                                   "trainer.selection_scope=global_batch", "trainer.accumulate_grad_batches=2"],
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_plan_equals_what_a_run_logs(shape: str, tiny_data: Path, tmp_path: Path, checkpointed_run: Path) -> None:
    """The dry-run plan's tokens and FLOPs (realised, nominal, CLM) are those the run then logs:
    one counting rule (the scope's) and one FLOPs function (accounting.step_cost) for both."""
    overrides = [*SHAPES[shape], "trainer.max_steps=3", "trainer.val_check_interval=3"]
    if "selection=rho1" in overrides:  # an online reference: its forward is counted in both
        overrides.append(f"selection.reference.ckpt_path={checkpointed_run}")
    plan = dry(tmp_path, tiny_data, *overrides)
    run = train(tmp_path / "trained", tiny_data, *overrides, cwd=tmp_path)
    assert plan["total_tokens"] == run["train_tokens"]
    for key in ("forward_tokens", "selected_tokens"):
        assert plan[key] == run[key], key
    for key in ("flops_realized", "flops_nominal", "flops_clm"):
        assert plan[key] == pytest.approx(run[key], rel=1e-12), key
    assert plan["scoring_pass"] == (shape == "eslm_global")  # reference_loss does not read the model


def test_every_gpt2_selection_experiment_plans_less_than_clm(tmp_path: Path) -> None:
    """The flagship recipes (40 micro-batches per step on one device) plan fewer realised FLOPs than
    clm_gpt2: no scoring pass on the default scope; Ada-ESLM planned at alpha_min, its most tokens."""
    def realised(experiment: str) -> float:
        out = tmp_path / f"{experiment}.json"
        ok(slm("train", f"+experiment={experiment}", "dry_run=true", "model.vocab_size=50257", f"plan_out={out}",
               f"hydra.run.dir={tmp_path}/run", cwd=tmp_path))
        return json.loads(out.read_text())["flops_realized"]

    clm = realised("clm_gpt2")
    for experiment in ("eslm_gpt2", "ada_eslm_gpt2", "rho1_gpt2", "random_gpt2", "hier_eslm_gpt2"):
        assert realised(experiment) < clm, experiment
