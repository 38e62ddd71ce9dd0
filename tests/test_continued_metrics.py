"""A continued run logs what an uninterrupted run logs: every row labelled with its optimizer step,
the rows before the resumed step kept, the later ones logged again once, in metrics.csv and in
TensorBoard (read back with TensorBoard's own EventAccumulator, which applies restart markers).

The reference is a 9-step run that was never interrupted; the continued runs stop at the end of a
run (6 or 7 steps, then 9 from its last.ckpt) and at a periodic checkpoint (7 steps, then 9 from
step0000004.ckpt). Preemption is in tests/test_preemption.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import train
from tests.metrics_rows import assert_same_rows, assert_same_scalars, csv_rows, tensorboard_scalars

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (pip install 'slm[tensorboard]')")

# Validation every 3 steps (at steps 2, 5, 8), a row for every step, decay fixed so that max_steps
# changes nothing but where the run stops.
COMMON = ["trainer.log_every_n_steps=1", "trainer.val_check_interval=3", "optim.decay_steps=9",
          "optim.warmup_steps=2", "logger=tensorboard"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(run, tiny_data, "trainer.max_steps=9", *COMMON, cwd=run.parent)
    return run


def assert_same_as(continued: Path, reference: Path, *, extra_val: int | None = None) -> None:
    """The continued run's logs and weights are the reference's; `extra_val`: the step of a
    validation the reference does not have (a first run that ended between validation steps
    validated at its end; that row stays, under the step it followed)."""
    (rows, throughput), (want, want_throughput) = csv_rows(continued), csv_rows(reference)
    if extra_val is not None:
        want = sorted(want + [r for r in rows if r[0] == extra_val and r[1].startswith("val/")])
        assert len(want) == len(csv_rows(reference)[0]) + 2  # val/loss and val/ppl
    assert_same_rows(rows, want)
    assert throughput == want_throughput  # the throughput rows' labels
    (scalars, tb_throughput), (tb_want, tb_want_throughput) = (tensorboard_scalars(d / "tensorboard")
                                                               for d in (continued, reference))
    if extra_val is not None:
        for tag in ("val/loss", "val/ppl"):
            tb_want[tag] = sorted(tb_want[tag] + [e for e in scalars[tag] if e[0] == extra_val])
    assert_same_scalars(scalars, tb_want)
    assert tb_throughput == tb_want_throughput
    a = torch.load(continued / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for k, v in b.items():
        torch.testing.assert_close(a[k], v, rtol=0, atol=1e-6)


def test_reference_rows(uninterrupted: Path) -> None:
    """The labels themselves: train rows 0-8 once each, validation at the step it follows."""
    rows, throughput = csv_rows(uninterrupted)
    assert [s for s, k, _ in rows if k == "train/loss"] == list(range(9))
    assert [s for s, k, _ in rows if k == "val/loss"] == [2, 5, 8]
    assert throughput == list(range(9))


@pytest.mark.parametrize("stop", [6, 7])
def test_continued_from_the_end_of_a_run(stop: int, uninterrupted: Path, tiny_data: Path, tmp_path: Path) -> None:
    """`stop` steps, then the same run dir to 9 (automatic resume from its last.ckpt, written after
    fit). Stopping at 6 the first run's last validation is one of the reference's (after step 5);
    stopping at 7 the first run validates at its end, after step 6, and that row is kept."""
    run = tmp_path / "run"
    train(run, tiny_data, f"trainer.max_steps={stop}", *COMMON, cwd=tmp_path)
    first, _ = csv_rows(run)
    assert [s for s, k, _ in first if k == "train/loss"] == list(range(stop))
    assert [s for s, k, _ in first if k == "val/loss"] == [2, 5] + ([6] if stop == 7 else [])
    summary = train(run, tiny_data, "trainer.max_steps=9", *COMMON, cwd=tmp_path)
    assert summary["steps"] == 9
    assert_same_as(run, uninterrupted, extra_val=6 if stop == 7 else None)


def test_continued_from_a_periodic_checkpoint(uninterrupted: Path, tiny_data: Path, tmp_path: Path) -> None:
    """7 steps with a checkpoint at 4, then 9 from step0000004.ckpt in the same run dir: the rows of
    steps 4-6 (and the validation after step 6, which ended the first run) are replaced by the
    continued run's."""
    run = tmp_path / "run"
    train(run, tiny_data, "trainer.max_steps=7", "trainer.checkpoint_every_n_steps=4", *COMMON, cwd=tmp_path)
    first, _ = csv_rows(run)
    # the first run's final validation (7 is not a validation step) is labelled with its last step
    assert [s for s, k, _ in first if k == "val/loss"] == [2, 5, 6]
    ckpt = run / "checkpoints" / "step0000004.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 4
    summary = train(run, tiny_data, "trainer.max_steps=9", "trainer.checkpoint_every_n_steps=4", f"ckpt_path={ckpt}",
                    *COMMON, cwd=tmp_path)
    assert summary["steps"] == 9
    assert_same_as(run, uninterrupted)
