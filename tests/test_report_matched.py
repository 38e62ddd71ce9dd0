"""`slm report`'s comparison against CLM (slm_cli/report/matched.py), on hand-made run dirs whose
figures are known: CLM at three lengths, a strategy with fewer FLOPs, and one whose FLOPs fall
outside CLM's range. Checked against numpy: np.interp in log FLOPs, sample std, and a brute-force
scan of the mean validation curve."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from slm_cli.report.matched import compare, steps_to_reach, verdict
from slm_cli.report.runs import SECONDS, find_runs
from slm_cli.report.table import build_table

FLOPS_PER_STEP = 1e9


def seconds(step: int, seed: int, pace: float) -> float:
    """Seconds of training after 0-based step ``step``: a little slower as the run goes on."""
    return (step + 1) * pace * (0.30 + 0.05 * seed) * (1 + 0.002 * step)


def make_run(root: Path, name: str, selection: str, seed: int, steps: int, val: list[float],
             flops_frac: float, sources: dict[str, float] | None = None, pace: float = 1.0) -> None:
    """A finished run: config, summary and a metrics.csv with a validation point every 10 steps and
    Lightning's train/time every 4 (so that a validation's seconds lie between two of them)."""
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    config = {"seed": seed, "task_name": "train", "selection": {"name": selection, "ratio": 0.6},
              "target": {"name": "onehot"}, "model": {"name": "gpt2-nano", "n_layer": 4},
              "trainer": {"max_steps": steps, "val_check_interval": 10}, "data": {"name": "wiki"}}
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    flops_clm = FLOPS_PER_STEP * steps
    summary = {"steps": steps, "train_tokens": 100 * steps, "val_loss": val[-1], "flops_clm": flops_clm,
               "flops_nominal": flops_clm * (1 - 2 * (1 - flops_frac)), "flops_realized": flops_clm * flops_frac,
               "val_sources": sources or {}}
    (d / "summary.json").write_text(json.dumps(summary))
    with open(d / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        names = sorted(sources or {})
        w.writerow(["step", "val/loss", "train/time", *(f"val/{n}/loss" for n in names)])
        for step in range(3, steps, 4):
            w.writerow([step, "", seconds(step, seed, pace), *("" for _ in names)])
        for i, v in enumerate(val):
            w.writerow([10 * (i + 1) - 1, v, "", *(v + 0.1 * k for k, _ in enumerate(names))])


def curve(final: float, points: int, seed: int) -> list[float]:
    return [final + 2.0 / (i + 1) - 2.0 / points + 0.01 * seed for i in range(points)]


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    for seed in (1, 2):
        for steps, final in ((60, 5.0), (80, 4.8), (100, 4.6)):
            make_run(tmp_path, f"clm{steps}_s{seed}", "clm", seed, steps, curve(final, steps // 10, seed), 1.0)
        # eslm: 100 steps, realised FLOPs 0.9 of CLM's, nominal 0.8
        make_run(tmp_path, f"eslm_s{seed}", "eslm", seed, 100, curve(4.5 + 0.05 * seed, 10, seed), 0.9,
                 {"wiki": 4.4 + seed, "noise": 7.0}, pace=1.3)
        # random: realised FLOPs below the shortest CLM run's: nothing to compare with
        make_run(tmp_path, f"random_s{seed}", "random", seed, 100, curve(4.9, 10, seed), 0.55)
    return tmp_path


def test_against_clm_matches_numpy(runs: Path) -> None:
    table = build_table(find_runs([str(runs)]))
    by_name = {c.row.finished[0].config["selection"]["name"]: c for c in compare(table)}
    assert set(by_name) == {"eslm", "random"}  # CLM rows are the reference, not compared

    def clm_final(steps: int) -> np.ndarray:
        return np.array([curve(f, steps // 10, s)[-1] for s in (1, 2) for st, f in ((60, 5.0), (80, 4.8), (100, 4.6))
                         if st == steps])

    eslm = by_name["eslm"]
    finals = np.array([curve(4.5 + 0.05 * s, 10, s)[-1] for s in (1, 2)])
    assert eslm.loss.mean == pytest.approx(finals.mean())
    assert eslm.loss.std == pytest.approx(finals.std(ddof=1))
    assert eslm.same_steps.mean == pytest.approx(clm_final(100).mean())
    # realised FLOPs 90e9 lie between CLM at 80 (80e9) and 100 steps (100e9): np.interp in log FLOPs
    budgets = np.log([60e9, 80e9, 100e9])
    means = [clm_final(s).mean() for s in (60, 80, 100)]
    stds = [clm_final(s).std(ddof=1) for s in (60, 80, 100)]
    assert eslm.same_realized.mean == pytest.approx(np.interp(math.log(90e9), budgets, means))
    assert eslm.same_realized.std == pytest.approx(np.interp(math.log(90e9), budgets, stds))
    # nominal FLOPs 80e9 equal the 80-step CLM budget exactly
    assert eslm.same_nominal.mean == pytest.approx(clm_final(80).mean())
    diff, se = eslm.loss.minus(eslm.same_steps)
    assert se == pytest.approx(math.sqrt(finals.var(ddof=1) / 2 + clm_final(100).var(ddof=1) / 2))
    assert diff == pytest.approx(finals.mean() - clm_final(100).mean())

    # steps to CLM's final loss, by brute force over a fine grid of the interpolated mean curve
    target = clm_final(100).mean()
    mean_curve = np.mean([curve(4.5 + 0.05 * s, 10, s) for s in (1, 2)], axis=0)
    grid = np.linspace(10, 100, 90001)
    first = grid[np.argmax(np.interp(grid, np.arange(10, 101, 10), mean_curve) <= target)]
    assert eslm.steps_to_clm == pytest.approx(first, abs=1e-2)

    rnd = by_name["random"]
    assert rnd.same_realized is None and rnd.same_nominal is None  # outside CLM's budgets: not extrapolated
    assert rnd.steps_to_clm is None  # never reaches CLM's loss


def test_report_writes_the_comparison_and_source_losses(runs: Path) -> None:
    from omegaconf import OmegaConf

    from slm_cli.report.build import report

    out = runs / "out"
    report(OmegaConf.create({"runs": [str(runs)], "out": str(out), "paths": {"log_dir": str(runs)}}))
    text = (out / "report.md").read_text()
    assert "## Against CLM" in text
    rows = list(csv.DictReader((out / "against_clm.csv").read_text().splitlines()))
    assert {r["selection.name"] for r in rows} == {"eslm", "random"}
    results = list(csv.DictReader((out / "report.csv").read_text().splitlines()))
    eslm = next(r for r in results if r["selection.name"] == "eslm")
    assert float(eslm["val_loss_wiki_mean"]) == pytest.approx(5.9)  # 4.4 + seed over seeds 1, 2
    assert float(eslm["val_loss_wiki_std"]) == pytest.approx(np.std([5.4, 6.4], ddof=1))
    # the mixture's per-source curves: one panel per source, drawn (not a blank canvas)
    import matplotlib.image

    pixels = matplotlib.image.imread(out / "val_loss_by_source.png")
    assert pixels.shape[1] > 700 and pixels[..., :3].std() > 0.05
    assert "val_loss_by_source.png" in text


def test_verdict_needs_twice_the_standard_error() -> None:
    assert verdict(-0.21, 0.1) == "better" and verdict(0.21, 0.1) == "worse"
    assert verdict(-0.19, 0.1) == verdict(0.19, 0.1) == "no difference"
    assert verdict(-0.5, 0.0).startswith("one run")  # no spread: no verdict either way
    assert verdict(0.0, 0.0) == "no difference"  # the same value on both sides
    assert verdict(-0.5, 0.0, spread_known=True) == "better"  # several runs each, all agreeing


def mean_seconds_at_validations(seeds: tuple[int, ...], steps: int, pace: float) -> np.ndarray:
    """Brute force: each run's train/time (logged every 4 steps) at its validation steps by np.interp
    from zero before the first step, then the mean over seeds."""
    logged = np.arange(3, steps, 4)
    val_steps = np.arange(9, steps, 10)
    return np.mean([np.interp(val_steps, np.r_[-1, logged], np.r_[0.0, [seconds(s, seed, pace) for s in logged]])
                    for seed in seeds], axis=0)


def test_seconds_to_clm_loss_match_brute_force(runs: Path) -> None:
    table = build_table(find_runs([str(runs)]))
    by_name = {c.row.finished[0].config["selection"]["name"]: c for c in compare(table)}
    eslm, rnd = by_name["eslm"], by_name["random"]
    target = np.mean([curve(4.6, 10, s)[-1] for s in (1, 2)])  # CLM's final loss after 100 steps
    t = mean_seconds_at_validations((1, 2), 100, 1.3)
    loss = np.mean([curve(4.5 + 0.05 * s, 10, s) for s in (1, 2)], axis=0)
    grid = np.linspace(t[0], t[-1], 200001)
    first = grid[np.argmax(np.interp(grid, t, loss) <= target)]
    assert eslm.seconds_to_clm == pytest.approx(first, abs=(grid[1] - grid[0]) * 2)
    assert eslm.clm_seconds == pytest.approx(mean_seconds_at_validations((1, 2), 100, 1.0)[-1])
    assert rnd.seconds_to_clm is None  # never reaches CLM's loss: nothing extrapolated
    # a target below the last validation is never reached either, however the curve trends
    assert steps_to_reach(eslm.row.finished, float(loss[-1]) - 1e-6, SECONDS) is None
    assert steps_to_reach(eslm.row.finished, float(loss[0]) + 1.0, SECONDS) == pytest.approx(t[0])


def write_eval(run: Path, name: str, accuracy: dict[str, float], mtime: float) -> None:
    """What `slm eval tasks=` writes into a run dir: lm-eval's results, accuracy as "acc,none"."""
    (run / "eval").mkdir(exist_ok=True)
    results = {task: {"alias": task, "acc,none": acc, "acc_stderr,none": 0.01, "perplexity,none": 30.0}
               for task, acc in accuracy.items()}
    path = run / "eval" / name
    path.write_text(json.dumps({"slm": {"checkpoint": str(run / "checkpoints/last.ckpt")}, "results": results}))
    os.utime(path, (mtime, mtime))


def test_downstream_accuracy_and_its_difference_from_clm(runs: Path) -> None:
    from slm_cli.report.table import downstream_rows

    acc = {("eslm", 1): (0.52, 0.30), ("eslm", 2): (0.56, 0.31), ("clm100", 1): (0.40, 0.30), ("clm100", 2): (0.42, 0.34)}
    for (name, seed), (a, b) in acc.items():
        run = runs / f"{name}_s{seed}"
        write_eval(run, "task_a+other.json", {"task_a": 0.0, "other": 0.7}, 1_000)  # older: task_a replaced
        write_eval(run, "task_a+task_b.json", {"task_a": a, "task_b": b}, 2_000)
        write_eval(run, "task_a@step0000050.json", {"task_a": 0.99}, 3_000)  # another checkpoint: not the final model
    table = build_table(find_runs([str(runs)]))
    header, rows = downstream_rows(table)
    assert header == ["configuration", "acc task_a", "acc other", "acc task_b"]  # in the order first found
    by_label = {r[0]: r for r in rows}
    mine = np.array([acc["eslm", 1][0], acc["eslm", 2][0]])
    assert by_label["ESLM"][1] == f"{mine.mean():.4f} ± {mine.std(ddof=1):.4f} (n=2)"
    assert set(by_label) == {"ESLM", "CLM, 100 steps"}  # the other runs have no results
    eslm = next(c for c in compare(table) if c.row.finished[0].config["selection"]["name"] == "eslm")
    for i, task in enumerate(("task_a", "task_b")):
        a = np.array([acc["eslm", s][i] for s in (1, 2)])
        b = np.array([acc["clm100", s][i] for s in (1, 2)])
        ours, clm = eslm.accuracy(f"acc:{task}")
        diff, se = ours.minus(clm)
        assert diff == pytest.approx(a.mean() - b.mean())
        # the seeds' spread and each side's acc_stderr (0.01: the same examples for every seed)
        assert se == pytest.approx(math.sqrt(a.var(ddof=1) / 2 + b.var(ddof=1) / 2 + 2 * 0.01**2))
        assert (ours.n, clm.n) == (2, 2)
    # task_a: +0.13 ± 0.026 is better (beyond 2 SE); task_b: −0.02 ± 0.026 is no difference
    assert verdict(*eslm.accuracy("acc:task_a")[0].minus(eslm.accuracy("acc:task_a")[1]), higher_is_better=True) == "better"
    assert verdict(*eslm.accuracy("acc:task_b")[0].minus(eslm.accuracy("acc:task_b")[1]), higher_is_better=True) == "no difference"
    assert verdict(-0.13, 0.02, higher_is_better=True) == "worse" and verdict(-0.13, 0.02) == "better"


def test_delta_against_clm_by_training_length(runs: Path) -> None:
    """ESLM at 60 and 100 steps, each against CLM after as many steps: Δ and its standard error by
    numpy, the table and the figure in the report."""
    from omegaconf import OmegaConf

    from slm_cli.report.build import report
    from slm_cli.report.matched import by_length

    for seed in (1, 2):
        make_run(runs, f"eslm60_s{seed}", "eslm", seed, 60, curve(5.2 + 0.03 * seed, 6, seed), 0.9)
    table = build_table(find_runs([str(runs)]))
    trends = by_length(table, compare(table))
    assert [t.label for t in trends] == ["ESLM"] and trends[0].steps == [60, 100]
    for (diff, se), steps, (mine, clm) in zip(trends[0].deltas(), (60, 100), ((5.2, 5.0), (4.5, 4.6)), strict=True):
        a = np.array([curve(mine + (0.03 if steps == 60 else 0.05) * s, steps // 10, s)[-1] for s in (1, 2)])
        b = np.array([curve(clm, steps // 10, s)[-1] for s in (1, 2)])
        assert diff == pytest.approx(a.mean() - b.mean())
        assert se == pytest.approx(math.sqrt(a.var(ddof=1) / 2 + b.var(ddof=1) / 2))
    out = runs / "out"
    report(OmegaConf.create({"runs": [str(runs)], "out": str(out), "paths": {"log_dir": str(runs)}}))
    text = (out / "report.md").read_text()
    assert "## Against CLM by training length" in text and "| configuration | Δ after 60 steps | Δ after 100 steps |" in text
    assert "![delta vs length](delta_vs_length.png)" in text and (out / "delta_vs_length.png").is_file()
