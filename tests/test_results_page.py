"""docs/results.md's page (slm_cli/report/results.py): the per-claim verdicts follow from the numbers,
each configuration meets its own comparison against CLM, and a whole page built from a hand-made
study (run dirs in reproduce_small.sh's layout, with known figures) states those figures.
References: numpy (means, sample std, standard errors), the figures written by hand."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from slm_cli.report import results
from slm_cli.report.build import Report
from slm_cli.report.matched import Comparison, Point, Trend, compare
from slm_cli.report.runs import FINISHED, Run, find_runs
from slm_cli.report.table import Row, build_table, keep_fraction
from slm_cli.summary import RunSummary

TOKENS_PER_STEP = 2048
FLOPS_PER_TOKEN = 1.0e6
STEPS = 100
VAL_EVERY = 20
T0 = 1_700_000_000.0  # the hand-made runs' start times (their config.yaml's mtime) count from here


# ---- verdicts and names on hand-made rows ------------------------------------------------------------

def run_of(config: dict | None = None, **figures: float) -> Run:
    return Run(dir=Path("/x"), config=config or {}, summary=RunSummary(**figures), status=FINISHED)


def entry(steps: tuple[float, float] | None, nominal: tuple[float, float] | None, saved: float = 0.27) -> results.Entry:
    """An ESLM configuration whose Δ against CLM is ``(diff, se)`` after the same steps and at the
    same nominal (and realised) FLOPs: its loss is 0 ± 0, CLM's −diff ± se (one run each)."""
    row = Row(key=(), runs=[run_of({"selection": {"name": "eslm", "alpha": 0.4}}, flops_saved_frac_nominal=saved)])

    def clm(d: tuple[float, float] | None) -> Point | None:
        return None if d is None else Point(-d[0], d[1], 1)

    return results.Entry(row, Comparison(row=row, loss=Point(0.0, 0.0, 1), same_steps=clm(steps),
                                         same_realized=clm(nominal), same_nominal=clm(nominal), steps=100,
                                         steps_to_clm=None))


def test_claim_verdicts_follow_the_deltas() -> None:
    claim = results.claim
    assert claim(entry((-0.10, 0.02), (-0.2, 0.02))).startswith("**reproduces**: a lower loss after the same steps with 27%")
    assert claim(entry((0.01, 0.02), (-0.1, 0.02))).startswith("**reproduces**: CLM's (within the noise) loss")
    assert claim(entry((0.10, 0.02), (0.01, 0.02))).startswith("**in part**")
    assert claim(entry((0.10, 0.02), (0.10, 0.02))).startswith("**does not reproduce**")
    assert claim(entry((0.10, 0.02), None)).startswith("**not shown**")
    assert claim(entry((0.10, 0.0), (0.1, 0.0))).startswith("**not judged**")  # one run each: no spread
    assert claim(entry((-0.10, 0.02), None, saved=-0.17)).startswith("**no saving**: 17% more nominal FLOPs")


def test_keep_method_and_join(tmp_path: Path) -> None:
    eslm = {"selection.name": "eslm", "selection.alpha": 0.4, "selection.score": "entropy", "target.name": "onehot"}
    assert keep_fraction({"name": "eslm", "alpha": 0.4, "score": "entropy"}) == pytest.approx(0.6)
    assert results.method(eslm) == "eslm-entropy"
    assert results.method({"selection.name": "eslm", "target.name": "kd"}) == "eslm-kd"
    assert results.method({"selection.name": "clm", "target.name": "coconts"}) == "coconts"
    assert keep_fraction({"name": "random", "ratio": 0.6}) == 0.6 and keep_fraction({"name": "clm"}) is None
    ada = results.Entry(Row(key=(), runs=[run_of({"selection": {"name": "ada_eslm", "alpha": 0.5}})]))
    assert ada.keep is None and results.keep_text(ada) == "adaptive"
    # each configuration of a report meets its own comparison against CLM; the CLM row has none
    for seed in (1, 2):
        make_run(tmp_path / "clm" / str(seed), {"name": "clm"}, seed, STEPS, 0.0)
        make_run(tmp_path / "eslm" / str(seed), {"name": "eslm", "alpha": 0.4}, seed, STEPS, -0.1, keep=0.6)
    table = build_table(find_runs([str(tmp_path)]))
    joined = {e.method: e for e in results.entries(Report(tmp_path, table, compare(table), []))}
    se = math.sqrt(2 * np.var([0.02, 0.04], ddof=1) / 2)  # the seeds' shifts, on both sides
    assert joined["clm"].against is None and joined["eslm"].delta("same_steps") == pytest.approx((-0.1, se))
    a = results.Entry(Row(key=(), runs=[run_of(val_loss=v) for v in (4.7, 5.0, 5.3)]))  # 5.0 ± 0.3
    b = results.Entry(Row(key=(), runs=[run_of(val_loss=v) for v in (4.8, 5.2, 5.6)]))  # 5.2 ± 0.4
    assert results.diff_between(a, b) == pytest.approx((-0.2, ((0.09 + 0.16) / 3) ** 0.5))


# ---- a whole page from a hand-made study -------------------------------------------------------------

def loss_at(step: float, final_offset: float, seed: int) -> float:
    """Validation loss after ``step`` steps: falling towards 4 + offset, a seed's own shift."""
    return 4.0 + final_offset + 3.0 * math.exp(-step / 60) + 0.02 * seed


def make_run(d: Path, selection: dict, seed: int, steps: int, offset: float, keep: float = 1.0,
             target: dict | None = None, data: str = "wikitext2", sources: dict[str, float] | None = None,
             extra_flops: float = 0.0, start: float = T0, trainer: dict | None = None) -> None:
    """A finished run dir: config, summary.json and metrics.csv with known figures; ``trainer``:
    more trainer settings (a warm start), or a data.* key (the window grid) as "data.<key>"."""
    (d / ".hydra").mkdir(parents=True)
    config = {"seed": seed, "task_name": "train", "selection": selection, "target": target or {"name": "onehot"},
              "model": {"name": "gpt2-nano", "n_embd": 128, "block_size": 128}, "data": {"name": data},
              "trainer": {"max_steps": steps, "val_check_interval": VAL_EVERY}}
    for key, value in (trainer or {}).items():
        group, _, leaf = key.rpartition(".")
        config[group or "trainer"][leaf] = value
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    tokens = TOKENS_PER_STEP * steps
    selected = math.ceil(keep * TOKENS_PER_STEP) * steps
    clm = tokens * FLOPS_PER_TOKEN
    nominal = tokens * FLOPS_PER_TOKEN / 3 + selected * 2 * FLOPS_PER_TOKEN / 3 + tokens * extra_flops
    realized = clm - (tokens - selected) * 0.2 * FLOPS_PER_TOKEN + tokens * extra_flops
    final = loss_at(steps, offset, seed)
    summary = {"steps": steps, "train_tokens": tokens, "selected_tokens": selected, "val_loss": final,
               "val_sources": {k: final + v for k, v in (sources or {}).items()}, "flops_realized": realized,
               "flops_nominal": nominal, "flops_clm": clm, "flops_saved_frac_realized": 1 - realized / clm,
               "flops_saved_frac_nominal": 1 - nominal / clm, "train_tokens_per_s": 1000.0 + 10 * seed,
               "wall_s": 60.0 + seed}
    (d / "summary.json").write_text(json.dumps(summary))
    with open(d / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        names = sorted(sources or {})
        w.writerow(["step", "train/selected_frac", "selection/alpha", "flops/nominal", "flops/realized", "val/loss",
                    *(f"val/{n}/loss" for n in names)])
        alpha = selection.get("alpha") if selection["name"] in ("eslm", "ada_eslm") else None
        for step in range(1, steps + 1):
            a = "" if alpha is None else (alpha if selection["name"] == "eslm" else max(0.2, alpha - 0.02 * step))
            w.writerow([step - 1, selected / tokens, a, nominal * step / steps, realized * step / steps, "",
                        *("" for _ in names)])
            if step % VAL_EVERY == 0:
                v = loss_at(step, offset, seed)
                w.writerow([step - 1, "", "", "", "", v, *(v + sources[n] for n in names)])
    os.utime(d / ".hydra" / "config.yaml", (start, start))
    os.utime(d / "summary.json", (start + summary["wall_s"], start + summary["wall_s"]))


# (folder, selection, keep, offset of the final loss, target, extra forward FLOPs per token)
METHODS = [("clm", {"name": "clm"}, 1.0, 0.0, None, 0.0),
           ("random", {"name": "random", "ratio": 0.6}, 0.6, 0.15, None, 0.0),
           ("eslm", {"name": "eslm", "alpha": 0.4, "score": "loss"}, 0.6, 0.5, None, 0.0),
           ("eslm_entropy", {"name": "eslm", "alpha": 0.4, "score": "entropy"}, 0.6, 0.01, None, 0.0),
           ("ada_eslm", {"name": "ada_eslm", "alpha": 0.5, "score": "loss"}, 0.8, 0.2, None, 0.0),
           ("eslm_kd", {"name": "eslm", "alpha": 0.4, "score": "loss"}, 0.6, 0.25,
            {"name": "kd", "teacher": "/t", "top_k": 64}, 1.0e6)]


def make_study(root: Path) -> None:
    """reproduce_small.sh's layout with 2 seeds per configuration (the keep sweep: 1)."""
    start = iter(T0 + 90 * i for i in range(1000))
    for size, shift in (("a", 0.0), ("b", -0.5)):
        for name, selection, keep, offset, target, extra in METHODS:
            for seed in (1, 2):
                make_run(root / "methods" / size / name / str(seed - 1), selection, seed, STEPS, offset + shift,
                         keep, target, extra_flops=extra, start=next(start))
        for steps in (40, 60, 80):
            for seed in (1, 2):
                make_run(root / "methods" / size / f"clm_steps{steps}" / str(seed - 1), {"name": "clm"}, seed, steps,
                         shift, start=next(start))
    for keep in (0.2, 0.4, 0.8):
        make_run(root / "methods/a/random_keeps" / str(keep), {"name": "random", "ratio": keep}, 1, STEPS,
                 0.1 + abs(keep - 0.6), keep, start=next(start))
        make_run(root / "methods/a/eslm_keeps" / str(keep), {"name": "eslm", "alpha": round(1 - keep, 6),
                                                            "score": "loss"}, 1, STEPS, 0.2 + keep / 10, keep,
                 start=next(start))
    mix = {"wiki": -0.3, "shakespeare": 0.4, "shuffled": 1.0}
    for name, selection, keep, offset in (("clm", {"name": "clm"}, 1.0, 0.0),
                                          ("random", {"name": "random", "ratio": 0.6}, 0.6, 0.1),
                                          ("rho1", {"name": "rho1", "ratio": 0.6}, 0.6, 0.2)):
        for seed in (1, 2):
            wiki = {**mix, "wiki": mix["wiki"] - (0.3 if name == "rho1" else 0.0)}
            make_run(root / "rho1" / name / str(seed - 1), selection, seed, STEPS, offset, keep, data="noisy-mix",
                     sources=wiki, start=next(start))
    for seed in (1, 2):
        make_run(root / "coconts/coconts" / str(seed - 1), {"name": "clm"}, seed, STEPS, -0.05,
                 target={"name": "coconts", "n": 4, "r": 8}, start=next(start))
    (root / "data" / "wikitext2").mkdir(parents=True)
    (root / "data" / "wikitext2" / "meta.json").write_text(json.dumps({"train_tokens": 290_000}))


PLAN = {"total_tokens": 294_912_000_000, "flops_nominal": 1.848e20, "flops_realized": 3.178e20, "world_size": 1}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("study")
    make_study(root)
    reports = results.write_reports(root)
    plans = {"clm_gpt2": PLAN, "eslm_gpt2": "dry run failed: no GPU here"}
    return root, results.page(root, reports, root / "docs" / "results.md", "reproduce", 0.6, plans)


def final_losses(offset: float, steps: int = STEPS) -> np.ndarray:
    return np.array([loss_at(steps, offset, seed) for seed in (1, 2)])


def delta_text(a: np.ndarray, b: np.ndarray) -> str:
    """Δ of the means ± the standard error sqrt(s₁²/n₁ + s₂²/n₂), by numpy."""
    return f"{a.mean() - b.mean():+.4f} ± {math.sqrt(a.var(ddof=1) / 2 + b.var(ddof=1) / 2):.4f}"


def table_after(page: str, heading: str) -> dict[str, str]:
    """The rows of the first table after ``heading``, by their first cell."""
    lines = page.splitlines()[page.splitlines().index(heading):]
    first = next(i for i, line in enumerate(lines) if line.startswith("| "))
    end = next((i for i in range(first, len(lines)) if not lines[i].startswith("|")), len(lines))
    return {line.split(" | ")[0][2:]: line for line in lines[first + 2:end]}


def test_page_states_the_studys_figures(study: tuple[Path, str]) -> None:
    _, page = study
    clm, eslm, entropy = final_losses(0.0), final_losses(0.5), final_losses(0.01)
    rows = table_after(page, "### size A")
    assert list(rows) == ["CLM", "Random (keep 0.6)", "ESLM (loss, keep 0.6)", "ESLM (entropy, keep 0.6)",
                          "Ada-ESLM (loss)", "ESLM-KD (loss, keep 0.6)"]
    eslm_row = rows["ESLM (loss, keep 0.6)"]
    # ESLM: worse than CLM after the same steps, by the hand-made offset, with its spread
    assert f"| {eslm.mean():.4f} ± {eslm.std(ddof=1):.4f} |" in eslm_row
    assert f"| {delta_text(eslm, clm)} (worse) |" in eslm_row
    assert f"| {delta_text(entropy, clm)} (no difference) |" in rows["ESLM (entropy, keep 0.6)"]
    # the keep-0.6 saving: 1 − (1/3 + 2/3·⌈0.6·2048⌉/2048) nominal, 0.2·(1 − k) realised
    k = math.ceil(0.6 * TOKENS_PER_STEP) / TOKENS_PER_STEP
    assert f"| {100 * 0.2 * (1 - k):.1f}% | {100 * (2 / 3) * (1 - k):.1f}% | never |" in eslm_row  # realised first
    assert "**ESLM: CLM's loss or better with fewer FLOPs (size A)**: **does not reproduce**" in page
    assert "  - ESLM-KD (loss, keep 0.6): **no saving**" in page  # its teacher's forward costs more than selection saves
    # the keep sweep: ESLM's loss grows with the keep here, random's is lowest at the main keep
    assert "Best keep by mean validation loss: ESLM (loss) 0.2, ESLM (entropy) 0.6, Random 0.6." in page
    # RHO-1 on the clean source: 0.3 nats better on it, 0.2 worse overall, against CLM
    rho1_wiki, clm_wiki = final_losses(0.2) - 0.6, final_losses(0.0) - 0.3
    assert f"RHO-1 against CLM is better (Δ {delta_text(rho1_wiki, clm_wiki)})" in page
    assert f"Over all three sources (noise included) it is worse (Δ {delta_text(final_losses(0.2), clm)})" in page
    rho = table_after(page, "## 2. RHO-1 on a noisy mixture")
    assert f"| {rho1_wiki.mean():.4f} ± {rho1_wiki.std(ddof=1):.4f} |" in rho["RHO-1 (keep 0.6)"]
    assert "**CoCoNTs converges faster than CLM**: it reaches CLM's final validation loss at step" in page


def test_page_runs_plans_machine_and_plots(study: tuple[Path, str]) -> None:
    from slm_cli.machine import describe, machine

    root, page = study
    # 6 methods × 2 seeds + CLM at 3 lengths × 2 seeds at two sizes, 6 sweep runs, 6 RHO-1, 2 CoCoNTs
    runs = 2 * (12 + 6) + 6 + 6 + 2
    seconds = (runs - 6) / 2 * (61 + 62) + 6 * 61  # wall_s is 60 + seed; the sweep has seed 1 only
    assert (f"on {describe(machine())}; {runs} training runs, {seconds / 3600:.1f} h of training in all, "
            f"two at a time: about {seconds / 7200:.1f} h of wall-clock.") in page
    # the plan's figures, and its time on one A100 / H100 at 40% MFU: 3.178e20 / (312e12 × 0.4) s
    assert "| `clm_gpt2` | 294,912,000,000 | 1.85e+20 | 3.18e+20 | 29.5 days | 9.3 days |" in page
    assert "| eslm_gpt2 | – | – | – | – | dry run failed: no GPU here |" in page
    img = root / "docs" / "img" / "results"
    assert sorted(p.name for p in img.iterdir()) == [
        "coconts-loss_vs_tokens.png", "methods_a-loss_vs_flops.png", "methods_a-selection.png",
        "methods_a-val_loss_vs_flops.png", "methods_b-val_loss_vs_flops.png", "rho1-val_loss_by_source.png"]
    assert "![size A: methods_a-val_loss_vs_flops](img/results/methods_a-val_loss_vs_flops.png)" in page
    assert (root / "reports" / "methods_a" / "report.md").is_file()  # each part's `slm report`
    # Ada-ESLM's α: from 0.5 down by 0.02 a step to its floor 0.2, the same for both seeds
    alphas = [max(0.2, 0.5 - 0.02 * step) for step in range(1, STEPS + 1)]
    # (it reaches 0.2 after 15 steps: the metrics' step 14, which counts from 0)
    assert f"| size A | Ada-ESLM (loss) | adaptive | 100 | 2 | 80.0% | {np.mean(alphas):.3f}; 0.200; there from step 14 |" in page
    # CLM's tokens at size A (2048 × 100), over the corpus's 290k training tokens
    assert "205k training tokens, 0.7 passes over a corpus of 290k tokens." in page


def test_machine_says_whether_there_is_a_gpu() -> None:
    import torch

    from slm_cli.machine import describe, machine

    record = machine()
    assert (record["gpu"] is None) == (not torch.cuda.is_available())
    assert describe({**record, "gpu": None}).startswith(f"{record['cpu']}, {record['nproc']} cores, no GPU; Python ")
    assert describe({**record, "gpu": "8 × NVIDIA H100 80GB HBM3"}).endswith(
        f", 8 × NVIDIA H100 80GB HBM3; Python {record['python']}, torch {record['torch']}")


def test_no_runs_is_one_line(tmp_path: Path) -> None:
    from slm_cli.errors import SlmError

    with pytest.raises(SlmError, match="no runs under .*run scripts/reproduce_small.sh first"):
        results.write_reports(tmp_path)


def test_downstream_and_training_length_on_the_page(tmp_path: Path) -> None:
    """The page's downstream table (accuracy ± std with n, Δ against CLM judged beyond 2 SE) and a
    claim's verdict at each training length, against numpy."""
    from slm_cli.report.build import write
    from slm_cli.report.matched import by_length

    acc = {("clm", 1): 0.40, ("clm", 2): 0.42, ("eslm", 1): 0.50, ("eslm", 2): 0.53}
    for steps in (60, 100):
        for seed in (1, 2):
            for name, selection, offset in (("clm", {"name": "clm"}, 0.0),
                                            ("eslm", {"name": "eslm", "alpha": 0.4, "score": "loss"}, 0.3)):
                d = tmp_path / "runs" / f"{name}{steps}" / str(seed)
                make_run(d, selection, seed, steps, offset * steps / 100, keep=0.6 if name == "eslm" else 1.0)
                if steps == 100:
                    (d / "eval").mkdir()
                    (d / "eval" / "slm_local.json").write_text(json.dumps({"results": {"lastword": {"acc,none": acc[name, seed]}}}))
    report = write(find_runs([str(tmp_path / "runs")]), tmp_path / "report")
    rows = results.entries(report)
    eslm = next(e for e in rows if e.method == "eslm" and e.steps == 100)
    clm = next(e for e in rows if e.method == "clm" and e.steps == 100)
    lines = results.downstream_table([clm, eslm]).splitlines()
    assert lines[0] == "| method | acc lastword | Δ vs CLM |"
    a, b = np.array([acc["eslm", 1], acc["eslm", 2]]), np.array([acc["clm", 1], acc["clm", 2]])
    assert lines[3] == (f"| ESLM (loss, keep 0.6) | {a.mean():.4f} ± {a.std(ddof=1):.4f} (n=2) | "
                        f"{delta_text(a, b)} (better) |")
    assert lines[2].startswith(f"| CLM | {b.mean():.4f} ± {b.std(ddof=1):.4f} (n=2) | – |")
    text = results.by_length_text(by_length(report.table, report.comparisons), eslm)
    deltas = [delta_text(np.array([loss_at(s, 0.3 * s / 100, seed) for seed in (1, 2)]), final_losses(0.0, s))
              for s in (60, 100)]
    assert text == (" By training length (Δ against CLM after the same steps): "
                    f"60 steps {deltas[0]} (worse), 100 steps {deltas[1]} (worse).")


def test_training_length_and_the_grid_on_the_page(tmp_path: Path) -> None:
    """reproduce_small.sh's longer runs (lengths/L300) and RHO-1 baselines on RHO-1's window grid:
    the Δ against CLM at each length (a warm start named by its share of the steps, the same at
    both), the claim's verdict per length, and RHO-1 against CLM on the grid, against numpy."""
    eslm = {"name": "eslm", "alpha": 0.4, "score": "loss"}
    for root, steps, shift in ((tmp_path / "methods" / "a", STEPS, 0.0), (tmp_path / "lengths" / "L300", 300, 0.1)):
        for seed in (1, 2):
            make_run(root / "clm" / str(seed), {"name": "clm"}, seed, steps, 0.0)
            make_run(root / "eslm" / str(seed), eslm, seed, steps, 0.4 + shift, keep=0.6)
            make_run(root / "eslm_warm" / str(seed), eslm, seed, steps, 0.2 - shift, keep=0.6,
                     trainer={"selection_start_step": steps // 4})
    mix = {"wiki": -0.3, "shuffled": 1.0}
    for sub, steps in (("", STEPS), ("L300", 300)):
        for name, selection, offset, grid in (("clm", {"name": "clm"}, 0.0, None), ("rho1", {"name": "rho1", "ratio": 0.6}, 0.2, None),
                                              ("clm_grid", {"name": "clm"}, 0.05, 128),
                                              ("random_grid", {"name": "random", "ratio": 0.6}, 0.1, 128)):
            for seed in (1, 2):
                make_run(tmp_path / "rho1" / sub / name / str(seed), selection, seed, steps, offset, data="noisy-mix",
                         sources={**mix, "wiki": mix["wiki"] - (0.3 if name == "rho1" else 0.0)},
                         trainer={} if grid is None else {"data.window_grid": grid})
    reports = results.write_reports(tmp_path)
    assert sorted(reports) == ["lengths", "methods_a", "rho1"]
    page = results.page(tmp_path, reports, tmp_path / "docs" / "results.md", "reproduce", 0.6, {})
    rows = table_after(page, "### Training length (size A)")
    assert list(rows) == ["ESLM (loss, keep 0.6)", "ESLM (loss, keep 0.6) warm start 25% of steps"]
    for label, offsets in (("ESLM (loss, keep 0.6)", (0.4, 0.5)), ("ESLM (loss, keep 0.6) warm start 25% of steps", (0.2, 0.1))):
        cells = [delta_text(np.array([loss_at(n, o, seed) for seed in (1, 2)]), final_losses(0.0, n))
                 for n, o in zip((STEPS, 300), offsets, strict=True)]
        assert rows[label] == f"| {label} | {cells[0]} (worse) | {cells[1]} (worse) |"
    assert "#### 300 steps" in page and "![training length: lengths-delta_vs_length](img/results/lengths-delta_vs_length.png)" in page
    assert (f"By training length (Δ against CLM after the same steps): 100 steps "
            f"{delta_text(final_losses(0.4), final_losses(0.0))} (worse), 300 steps") in page
    wiki = {name: np.array([loss_at(n, o, seed) + w for seed in (1, 2)])
            for name, o, w, n in (("rho1", 0.2, -0.6, STEPS), ("clm_grid", 0.05, -0.3, STEPS))}
    assert (f"  - After 100 steps: against CLM on RHO-1's window grid, on the clean text RHO-1 is better "
            f"(Δ {delta_text(wiki['rho1'], wiki['clm_grid'])})") in page
    assert "  - After 300 steps: RHO-1 against CLM on the clean text is better" in page


def test_where_each_method_pays_off(study: tuple[Path, str]) -> None:
    """A setting's cell: the verdict at the same realised FLOPs and the time to CLM's loss as a share
    of CLM's; the gap's course over lengths judged beyond 2 SE of its change; and the page's lines,
    from the hand-made study's offsets (ESLM worse everywhere, CoCoNTs better on the same FLOPs)."""
    row = Row(key=(), runs=[run_of({"selection": {"name": "eslm", "alpha": 0.4}})])

    def with_clm(realised: float, seconds: float | None) -> results.Entry:
        return results.Entry(row, Comparison(row=row, loss=Point(5.0, 0.01, 3), same_steps=Point(5.0, 0.01, 3),
                                             same_realized=Point(realised, 0.01, 3), same_nominal=None, steps=100,
                                             steps_to_clm=None, seconds_to_clm=seconds, clm_seconds=60.0))

    assert results.payoff_cell(with_clm(5.1, 30.0)) == ("realised FLOPs: better; CLM's loss in 50% of CLM's time", True)
    assert results.payoff_cell(with_clm(4.9, None)) == ("realised FLOPs: worse; CLM's loss: never", False)
    assert results.payoff_cell(with_clm(4.9, 90.0)) == ("realised FLOPs: worse; CLM's loss in 150% of CLM's time", False)
    assert results.payoff_cell(with_clm(5.0, 45.0))[1]  # no different per FLOP, but sooner on the clock

    def trend(first: float, last: float) -> Trend:
        return Trend("x", [Comparison(row=row, loss=Point(d, 0.01, 3), same_steps=Point(0.0, 0.01, 3), same_realized=None,
                                      same_nominal=None, steps=n, steps_to_clm=None)
                           for n, d in ((200, first), (1600, last))])

    # the change's SE: each Δ's SE is sqrt(2 * 0.01² / 3); the change's, sqrt(2) times that
    se = math.sqrt(2) * math.sqrt(2 * 0.01**2 / 3)
    assert results.trend_word(trend(0.5, 0.2)) == "narrows" and results.trend_word(trend(0.5, 0.9)) == "widens"
    assert results.trend_word(trend(0.5, 0.5 + 1.9 * se)) == "holds" and results.trend_word(trend(0.5, 0.5 + 2.1 * se)) == "widens"
    _, page = study
    assert "## Where each method pays off" in page
    assert "- **ESLM (loss, keep 0.6)**: pays off in no setting of this study." in page
    assert "- **CoCoNTs**: pays off at size A, 100 steps." in page
    assert "- **RHO-1 (on the noisy mixture, judged on clean held-out text)**: pays off at 100 steps" in page


def test_a_resumed_runs_seconds(tmp_path: Path) -> None:
    """A resumed run's wall time: its last process's wall_s plus the training time of the processes
    before it, read from train/time, which restarts from zero in each process (here 20 s, then 15)."""
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("step,train/time\n4,10.0\n9,20.0\n14,5.0\n19,15.0\n")
    run = Run(dir=tmp_path, config={}, summary=RunSummary(wall_s=18.0), status=FINISHED, metrics_path=metrics)
    assert results.run_seconds(run) == pytest.approx(18.0 + 20.0)
    metrics.write_text("step,train/time\n4,10.0\n9,20.0\n")  # one process: its wall time alone
    assert results.run_seconds(Run(dir=tmp_path, config={}, summary=RunSummary(wall_s=25.0), status=FINISHED,
                                   metrics_path=metrics)) == pytest.approx(25.0)


def test_downstream_se_counts_the_tasks_examples(tmp_path: Path) -> None:
    """Every seed answers the same examples, so a mean accuracy's standard error adds lm-eval's
    acc_stderr (averaged over seeds) to the seeds' spread: Δ's SE = sqrt(s_a²/n + s_b²/n + e_a² + e_b²).
    With seeds that agree exactly, a difference inside the examples' error is no difference."""
    acc = {("clm", 1): 0.25, ("clm", 2): 0.25, ("eslm", 1): 0.26, ("eslm", 2): 0.26}
    err = {("clm", 1): 0.025, ("clm", 2): 0.027, ("eslm", 1): 0.026, ("eslm", 2): 0.026}
    for seed in (1, 2):
        for name, selection in (("clm", {"name": "clm"}), ("eslm", {"name": "eslm", "alpha": 0.4, "score": "loss"})):
            d = tmp_path / "runs" / name / str(seed)
            make_run(d, selection, seed, STEPS, 0.0, keep=0.6 if name == "eslm" else 1.0)
            (d / "eval").mkdir()
            (d / "eval" / "slm_local.json").write_text(json.dumps(
                {"results": {"nextline": {"acc,none": acc[name, seed], "acc_stderr,none": err[name, seed]}}}))
    from slm_cli.report.build import write

    rows = results.entries(write(find_runs([str(tmp_path / "runs")]), tmp_path / "report"))
    se = math.sqrt(0 + 0 + np.mean([0.026, 0.026]) ** 2 + np.mean([0.025, 0.027]) ** 2)
    assert results.downstream_table(rows).splitlines()[-1] == (
        f"| ESLM (loss, keep 0.6) | 0.2600 ± 0.0000 (n=2) | +0.0100 ± {se:.4f} (no difference) |")
