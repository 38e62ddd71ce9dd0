"""`slm report`'s comparison against CLM (slm_cli/report/matched.py), on hand-made run dirs whose
figures are known: CLM at three lengths, a strategy with fewer FLOPs, and one whose FLOPs fall
outside CLM's range. Checked against numpy: np.interp in log FLOPs, sample std, and a brute-force
scan of the mean validation curve."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from slm_cli.report.matched import compare, verdict
from slm_cli.report.runs import find_runs
from slm_cli.report.table import build_table

FLOPS_PER_STEP = 1e9


def make_run(root: Path, name: str, selection: str, seed: int, steps: int, val: list[float],
             flops_frac: float, sources: dict[str, float] | None = None) -> None:
    """A finished run: config, summary and a metrics.csv with a validation point every 10 steps."""
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
        w.writerow(["step", "val/loss", *(f"val/{n}/loss" for n in names)])
        for i, v in enumerate(val):
            w.writerow([10 * (i + 1) - 1, v, *(v + 0.1 * k for k, _ in enumerate(names))])


def curve(final: float, points: int, seed: int) -> list[float]:
    return [final + 2.0 / (i + 1) - 2.0 / points + 0.01 * seed for i in range(points)]


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    for seed in (1, 2):
        for steps, final in ((60, 5.0), (80, 4.8), (100, 4.6)):
            make_run(tmp_path, f"clm{steps}_s{seed}", "clm", seed, steps, curve(final, steps // 10, seed), 1.0)
        # eslm: 100 steps, realised FLOPs 0.9 of CLM's, nominal 0.8
        make_run(tmp_path, f"eslm_s{seed}", "eslm", seed, 100, curve(4.5 + 0.05 * seed, 10, seed), 0.9,
                 {"wiki": 4.4 + seed, "noise": 7.0})
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
