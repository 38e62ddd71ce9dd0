"""Reading a run's logged metrics back, to compare a continued run with an uninterrupted one."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

# What the module logs; the other columns are Lightning's: `epoch`, its pass counter (slm's loader
# is endless; a run continued from a finished one counts a second pass), and the throughput
# monitor's timings of this process (train/time, train/samples, ... restart with each process).
MODULE_PREFIXES = ("train/loss", "train/selected_frac", "train/grad_norm", "lr", "val/", "flops/", "selection/")


def is_module_metric(key: str) -> bool:
    return key.startswith(MODULE_PREFIXES)


def csv_rows(run_dir: Path) -> tuple[list[tuple[int, str, float]], list[int]]:
    """metrics.csv as sorted (step, key, value) of the module's metrics, and the steps of the
    throughput monitor's rows (their values are timings, but their labels must be right too)."""
    metrics, throughput = [], []
    with open(run_dir / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row["step"]))
            metrics += [(step, k, float(v)) for k, v in row.items() if v and is_module_metric(k)]
            throughput += [step] if row.get("train/time") else []
    return sorted(metrics), sorted(throughput)


def tensorboard_scalars(log_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], list[int]]:
    """The module's scalars as TensorBoard's own reader shows them (restart markers applied), and
    the steps of the throughput scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    tags = acc.Tags()["scalars"]
    scalars = {t: sorted((e.step, e.value) for e in acc.Scalars(t)) for t in tags if is_module_metric(t)}
    return scalars, sorted(e.step for e in acc.Scalars("train/time")) if "train/time" in tags else []


def assert_same_rows(got: list[tuple[int, str, float]], want: list[tuple[int, str, float]]) -> None:
    assert [(s, k) for s, k, _ in got] == [(s, k) for s, k, _ in want]
    for (s, k, a), (_, _, b) in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7), (s, k)


def assert_same_scalars(got: dict[str, list[tuple[int, float]]], want: dict[str, list[tuple[int, float]]]) -> None:
    assert sorted(got) == sorted(want)
    for tag in want:
        assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in want[tag]], rel=1e-5, abs=1e-7), tag
