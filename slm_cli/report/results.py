"""docs/results.md: the papers' claims at small scale, from the runs of scripts/reproduce_small.sh.

    python -m slm_cli.report.results ROOT RESULTS.md [--keep K] [--command "..."] [--slm SLM]

ROOT is the script's output folder. Each part of the study (`PARTS`: its run folders under ROOT)
is reported as `slm report` reports it, into ROOT/reports/<part>/ (slm_cli/report/build.py's
`write`), and the page is built from the same objects: the results table (report/table.py) and
the comparison against CLM (report/matched.py). It states every figure with its spread and says
per claim, from the numbers, whether it reproduces: a difference counts only beyond twice its
standard error. The plots are copied beside the page (img/results/). The GPU time at the papers'
scale comes from the plans of `slm train +experiment=<name>_gpt2 dry_run=true plan_out=<file>`
(their JSON is kept in ROOT/plans/).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from slm_cli.errors import SlmError
from slm_cli.estimate import ASSUMED_MFU, GPU_PEAK
from slm_cli.machine import describe, machine
from slm_cli.outputs import atomic_write
from slm_cli.report import build
from slm_cli.report import results_text as prose
from slm_cli.report.curves import resumed_time
from slm_cli.report.matched import (
    LENGTH_NOTE,
    SIGNIFICANCE,
    Comparison,
    Point,
    Trend,
    by_length,
    delta,
    length_text,
    point,
    reach_text,
    verdict,
)
from slm_cli.report.runs import ACCURACY, SECONDS, SOURCE_LOSS, Run, find_runs, flatten
from slm_cli.report.table import (
    Row,
    accuracy_cell,
    figures_named,
    keep_fraction,
    markdown_table,
    method_name,
    si,
    window_keep,
)
from slm_cli.text import duration

# part -> (its name on the page, its run folders under ROOT: the first must exist, the others join
# where they do). "lengths" is size A's comparison at every length: the main runs, lengths/L<steps>/
# and CoCoNTs, each against CLM after as many steps.
PARTS = {"methods_a": ("size A", ["methods/a"]), "methods_b": ("size B", ["methods/b"]),
         "lengths": ("training length", ["lengths", "methods/a", "coconts"]),
         "rho1": ("RHO-1 mixture", ["rho1"]), "coconts": ("CoCoNTs", ["coconts", "methods/a/clm"])}
PLOTS = {"methods_a": ["val_loss_vs_flops.png", "loss_vs_flops.png", "val_loss_vs_seconds.png", "selection.png"],
         "methods_b": ["val_loss_vs_flops.png"], "lengths": ["delta_vs_length.png"],
         "rho1": ["val_loss_by_source.png"], "coconts": ["loss_vs_tokens.png"]}
GPT2_EXPERIMENTS = ["clm_gpt2", "eslm_gpt2", "ada_eslm_gpt2", "hier_eslm_gpt2", "rho1_gpt2", "coconts_gpt2"]
GPUS = {"A100": "1 A100", "H100 SXM": "1 H100"}  # the plan's GPUs shown, and their column
ORDER = ["clm", "random", "eslm", "eslm-entropy", "ada_eslm", "hier_eslm", "hier_eslm-entropy", "eslm-kd"]
COMPARISONS = ("same_steps", "same_realized", "same_nominal")  # realised first: what runs; nominal, the papers'
WIKI = f"{SOURCE_LOSS}wiki"  # the RHO-1 mixture's clean source: its validation loss


# ---- one configuration as the page reads it --------------------------------------------------------

def method(config: dict[str, Any]) -> str:
    """A run's method as the page finds it (its key, not its name for a reader: that is
    table.method_name's), from its flat config: eslm, eslm-entropy, eslm-kd, ada_eslm, hier_eslm,
    random, clm, coconts, rho1; "-warm<N>" after a warm start of N steps, "-grid" for a baseline on
    RHO-1's window grid (clm-grid)."""
    strategy = name = config.get("selection.name") or "clm"
    if config.get("selection.score") == "entropy" and name in ("eslm", "ada_eslm", "hier_eslm"):
        name += "-entropy"
    target = config.get("target.name") or ""
    if target == "kd":
        name += "-kd"
    elif target not in ("", "onehot"):
        name = target if name == "clm" else f"{name}+{target}"
    start = config.get("trainer.selection_start_step")
    if strategy != "clm" and isinstance(start, int) and start > 0:
        name += f"-warm{start}"
    if strategy != "rho1" and config.get("data.window_grid") is not None:
        name += "-grid"
    return name


@dataclass
class Entry:
    """One configuration of a part: its row of the results table and its comparison against CLM."""

    row: Row
    against: Comparison | None = None

    @cached_property
    def config(self) -> dict[str, Any]:
        """The flat config of the row's first run: the runs of a row share every key that differs
        between rows, and the rest is shared by all."""
        return flatten(self.row.runs[0].config)

    @property
    def method(self) -> str:
        return method(self.config)

    @property
    def name(self) -> str:
        """The method as a reader names it: "ESLM (entropy, keep 0.6)" (table.method_name)."""
        return method_name(self.config).name

    @property
    def keep(self) -> float | None:
        return keep_fraction(self.row.runs[0].config.get("selection") or {})

    @property
    def n(self) -> int:
        return len(self.row.finished)

    @property
    def steps(self) -> float | None:
        """The configured steps, else the mean steps the runs made."""
        return self.config.get("trainer.max_steps") or self.mean("steps")

    def mean(self, figure: str) -> float | None:
        return self.row.stats(figure)[0]

    def pm(self, figure: str, digits: int = 4) -> str:
        mean, std, _ = self.row.stats(figure)
        return pm(mean, std, digits)

    def point(self, figure: str) -> Point | None:
        return point(self.row, figure)

    def delta(self, name: str) -> tuple[float, float] | None:
        """(Δ loss against CLM, its standard error) of one comparison (COMPARISONS), if made."""
        clm = getattr(self.against, name) if self.against else None
        return None if clm is None else self.against.loss.minus(clm)


def entries(report: build.Report) -> list[Entry]:
    """A written report's configurations, each with its comparison against CLM."""
    against = {id(c.row): c for c in report.comparisons}
    return [Entry(row, against.get(id(row))) for row in report.table.rows]


# ---- formatting ------------------------------------------------------------------------------------

def pm(mean: float | None, std: float | None, digits: int = 4) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std else "")


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> str:
    """A markdown table: the first ``text_columns`` left-aligned, the numbers right-aligned."""
    return markdown_table(header, rows, "l" * text_columns + "r" * (len(header) - text_columns))


def delta_cell(diff_se: tuple[float, float] | None) -> str:
    if diff_se is None:
        return "–"
    diff, se = diff_se
    return f"{diff:+.4f} ± {se:.4f} ({verdict(diff, se)})"


def diff_between(a: Entry, b: Entry | None, figure: str = "val_loss") -> tuple[float, float] | None:
    """a − b of a figure's means, with the standard error of the difference."""
    points = [None if e is None else e.point(figure) for e in (a, b)]
    return None if None in points else points[0].minus(points[1])


def said(diff_se: tuple[float, float] | None, better: str, worse: str, same: str) -> str:
    if diff_se is None:
        return "not measured"
    diff, se = diff_se
    word = verdict(diff, se)
    text = {"better": better, "worse": worse, "no difference": same}.get(word, word)
    return f"{text} (Δ {diff:+.4f} ± {se:.4f})"


def word_of(diff_se: tuple[float, float] | None) -> str | None:
    return None if diff_se is None else verdict(*diff_se)


def verdict_of(diff_se: tuple[float, float] | None) -> str:
    if diff_se is None:
        return "not comparable (outside CLM's budgets)"
    diff, se = diff_se
    word = verdict(diff, se)
    text = {"better": "better than CLM", "worse": "worse than CLM",
            "no difference": "no different from CLM"}.get(word, word)
    return f"{text} (Δ loss {diff:+.4f} ± {se:.4f})"


def claim(entry: Entry) -> str:
    """Does a strategy reach CLM's loss (or better) with fewer FLOPs? From its three comparisons."""
    words = {name: word_of(entry.delta(name)) for name in COMPARISONS}
    saved = entry.mean("flops_saved_frac_nominal")
    saved_text = "" if saved is None else f" with {100 * saved:.0f}% fewer nominal FLOPs"
    if saved is not None and saved <= 0:
        head = (f"**no saving**: {-100 * saved:.0f}% more nominal FLOPs than CLM on the same tokens (the "
                "teacher's forward passes), so it cannot reach CLM's loss with fewer FLOPs")
    elif words["same_steps"] is None or words["same_steps"].startswith("one run"):
        head = "**not judged**: too few runs"
    elif words["same_steps"] in ("better", "no difference"):
        head = ("**reproduces**: " + ("a lower" if words["same_steps"] == "better" else "CLM's (within the noise)")
                + f" loss after the same steps{saved_text}")
    elif words["same_nominal"] in ("better", "no difference"):
        head = "**in part**: worse than CLM after the same steps, but not worse at the same nominal FLOPs"
    elif words["same_nominal"] is None:
        head = "**not shown**: worse after the same steps; its FLOPs fall outside CLM's budgets"
    else:
        head = "**does not reproduce**: worse than CLM after the same steps and at the same nominal FLOPs"
    return (f"{head}. Same steps: {verdict_of(entry.delta('same_steps'))}; same realised FLOPs: "
            f"{verdict_of(entry.delta('same_realized'))}; same nominal FLOPs (the papers' accounting): "
            f"{verdict_of(entry.delta('same_nominal'))}.")


def keep_text(entry: Entry) -> str:
    """The keep as the tables write it: "0.6"; "0.5 × 0.6" for Hierarchical ESLM (windows × their
    tokens); "adaptive" for Ada-ESLM; "all" for CLM."""
    selection = entry.row.runs[0].config.get("selection") or {}
    if (k := entry.keep) is not None:
        windows = window_keep(selection)
        return f"{k:g}" if windows is None else f"{windows:g} × {k:g}"
    return "adaptive" if entry.config.get("selection.name") == "ada_eslm" else "all"


def reach_cells(e: Entry) -> list[str]:
    """Steps and seconds of training to CLM's final loss (matched.reach_text); "–" for CLM."""
    if e.against is None:
        return ["–", "–"]
    return list(reach_text(e.against))


# ---- the tables ------------------------------------------------------------------------------------

def main_rows(rows: Sequence[Entry], steps: float, main_keep: float) -> list[Entry]:
    """The full-length rows at the main keep: one per method (the keep sweep's other keeps left out)."""
    full = [e for e in rows if e.steps == steps and e.keep in (None, main_keep)]
    return sorted(full, key=lambda e: ORDER.index(e.method) if e.method in ORDER else len(ORDER))


def methods_table(rows: Sequence[Entry]) -> str:
    header = ["method", "keep", "n", "val loss", "Δ vs CLM, same steps", "Δ vs CLM, same realised FLOPs",
              "Δ vs CLM, same nominal FLOPs", "saved realised", "saved nominal", "steps to CLM's loss",
              "seconds to CLM's loss"]
    out = [[e.name, keep_text(e), f"{e.n}", e.pm("val_loss"), *(delta_cell(e.delta(name)) for name in COMPARISONS),
            pct(e.mean("flops_saved_frac_realized")), pct(e.mean("flops_saved_frac_nominal")), *reach_cells(e)]
           for e in rows]
    return table(header, out)


def downstream_table(rows: Sequence[Entry]) -> str:
    """Accuracy per downstream task (mean ± std over seeds, n) and its Δ against CLM after the
    same steps (± its standard error, judged beyond 2 SE; higher is better); "" without results."""
    tasks = figures_named([e.row for e in rows], ACCURACY)
    if not tasks:
        return ""
    header = ["method", *(h for t in tasks for h in (f"acc {t[len(ACCURACY):]}", "Δ vs CLM"))]
    out = []
    for e in rows:
        cells = []
        for task in tasks:
            pair = e.against.accuracy(task) if e.against else None
            cells += [accuracy_cell(e.row, task), "–" if pair is None else delta(pair[0], pair[1], higher_is_better=True)]
        out.append([e.name, *cells])
    return table(header, out)


def sweep_table(rows: Sequence[Entry], steps: float) -> tuple[str, dict[str, float]]:
    """val loss of random / ESLM / ESLM-entropy at each keep (full length), and each one's best keep."""
    found: dict[str, dict[float, Entry]] = {}
    for e in rows:
        if e.steps == steps and e.keep is not None and e.method in ("random", "eslm", "eslm-entropy"):
            found.setdefault(method_name(e.config).series, {})[e.keep] = e
    keeps = sorted({k for by in found.values() for k in by})
    out, best = [], {}
    for name, by in found.items():
        out.append([name, *("–" if k not in by else f"{by[k].pm('val_loss')} (n={by[k].n})" for k in keeps)])
        best[name] = min(by, key=lambda k: by[k].mean("val_loss") or math.inf)
    return table(["method", *(f"keep {k:g}" for k in keeps)], out), best


def settled_step(steps: Sequence[float], values: Sequence[float]) -> float:
    """The first logged step from which a series keeps its final value to the end of the run."""
    i = len(values) - 1
    while i > 0 and abs(values[i - 1] - values[-1]) <= 1e-9:
        i -= 1
    return steps[i]


def alpha_text(entry: Entry) -> str:
    """ESLM's α over the row's runs: the mean over each run and the final value, averaged; for an
    α that moves (Ada-ESLM), also the step from which it stays at its final value (mean over runs)."""
    series = [run.metrics["selection/alpha"] for run in entry.row.runs if run.metrics.get("selection/alpha", ([], []))[1]]
    if not series:
        return "–"
    alphas = [values for _, values in series]
    text = (f"{sum(sum(a) / len(a) for a in alphas) / len(alphas):.3f}; "
            f"{sum(a[-1] for a in alphas) / len(alphas):.3f}")
    if any(max(a) - min(a) > 1e-9 for a in alphas):
        text += f"; there from step {sum(settled_step(*s) for s in series) / len(series):.0f}"
    return text


def runs_table(parts: dict[str, list[Entry]]) -> str:
    header = ["part", "method", "keep", "steps", "n", "selected", "alpha (mean; final)", "tokens/s", "wall"]
    out = [[PARTS[part][0], e.name, keep_text(e), f"{e.steps:.0f}", f"{e.n}", pct(e.mean("selected_frac")),
            alpha_text(e), e.pm("train_tokens_per_s", 0), f"{(e.mean('wall_s') or 0):.0f} s"]
           for part, rows in parts.items() for e in rows]
    return table(header, out, text_columns=2)


def scale_text(sizes: dict[str, list[Entry]]) -> str:
    out = []
    for name in ("random", "eslm", "eslm-entropy", "ada_eslm", "eslm-kd"):
        cells = []
        for comparison in ("same_steps", "same_realized"):
            for part in ("methods_a", "methods_b"):
                e = next((x for x in sizes[part] if x.method == name), None)
                d = e.delta(comparison) if e else None
                cells.append("–" if d is None else f"{d[0]:+.4f}")
        named = next((x.name for part in sizes for x in sizes[part] if x.method == name), name)
        out.append([named, *cells])
    return ("Δ validation loss against CLM at each size, after the same steps and at the same realised FLOPs "
            "(negative: the method is ahead). Two sizes a factor of about four apart in parameters can show a "
            "direction, not a scaling law.\n\n"
            + table(["method", "same steps, size A", "same steps, size B", "same realised FLOPs, size A",
                     "same realised FLOPs, size B"], out))


# ---- the plans at the papers' scale ----------------------------------------------------------------

def plan(slm: str, experiment: str, folder: Path) -> dict[str, Any]:
    """The dry-run plan of an experiment: the JSON `slm train dry_run=true plan_out=` writes."""
    path = folder / f"{experiment}.json"
    path.unlink(missing_ok=True)
    subprocess.run([slm, "train", f"+experiment={experiment}", "dry_run=true", f"plan_out={path}"],
                   capture_output=True, text=True, timeout=300, check=True)
    return json.loads(path.read_text())


def gpu_time(figures: dict[str, Any], gpu: str) -> str:
    """A plan's realised FLOPs on its devices, each a ``gpu`` at the plan's assumed MFU."""
    return duration(figures["flops_realized"] / (GPU_PEAK[gpu] * ASSUMED_MFU * figures["world_size"]))


def gpu_estimates(plans: dict[str, dict[str, Any] | str]) -> str:
    """Total FLOPs and GPU time of the papers'-scale experiments (a plan, or why there is none)."""
    rows = []
    for name, figures in plans.items():
        if isinstance(figures, str):
            rows.append([name, "–", "–", "–", *("–" for _ in list(GPUS)[1:]), figures])  # the reason in the last
            continue
        rows.append([f"`{name}`", f"{figures['total_tokens']:,}", f"{figures['flops_nominal']:.3g}",
                     f"{figures['flops_realized']:.3g}", *(gpu_time(figures, gpu) for gpu in GPUS)])
    return table(["experiment", "tokens", "FLOPs nominal", "FLOPs realised", *GPUS.values()], rows)


def plans(slm: str, folder: Path) -> dict[str, dict[str, Any] | str]:
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict[str, Any] | str] = {}
    for name in GPT2_EXPERIMENTS:
        try:
            out[name] = plan(slm, name, folder)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            out[name] = f"dry run failed: {exc}"
    return out


# ---- the page ------------------------------------------------------------------------------------

def corpus_tokens(root: Path) -> float:
    """Training tokens of the main corpus (its prepared meta.json), 0 if not found."""
    for meta in sorted((root / "data").glob("*/meta.json")):
        name = meta.parent.name  # not the mixture, its sources (<name>.tok-<sha>) or the reference's text
        if "mix" not in name and ".tok-" not in name and "test" not in name:
            return float(json.loads(meta.read_text()).get("train_tokens", 0))
    return 0.0


def run_seconds(run: Run) -> float:
    """A run's wall time: its last process's (summary.json's wall_s) plus the training time of the
    processes before it when it was resumed (train/time, which each process counts from zero)."""
    wall = (run.summary.wall_s if run.summary else None) or 0.0
    _, times = run.metrics.get(SECONDS, ([], []))
    return wall + (float(resumed_time(times)[-1]) - times[-1] if times else 0.0)


def run_time(parts: dict[str, list[Entry]]) -> str:
    """How many runs the parts hold (each counted once) and their summed wall time, which two lanes
    side by side take in half."""
    runs = {run.dir: run for rows in parts.values() for e in rows for run in e.row.finished}
    seconds = sum(run_seconds(run) for run in runs.values())
    return (f"{len(runs)} training runs, {seconds / 3600:.1f} h of training in all, two at a time: "
            f"about {seconds / 7200:.1f} h of wall-clock")


def copy_plots(reports: dict[str, build.Report], out_dir: Path) -> dict[str, list[str]]:
    """Each part's figures named in PLOTS, copied to <out_dir>/img/results/<part>-<name>."""
    img = out_dir / "img" / "results"
    img.mkdir(parents=True, exist_ok=True)
    shown: dict[str, list[str]] = {}
    for part, names in PLOTS.items():
        drawn = {path.name: path for path, _ in reports[part].figures} if part in reports else {}
        for name in names:
            if name in drawn:
                dst = img / f"{part}-{name}"
                shutil.copyfile(drawn[name], dst)
                shown.setdefault(part, []).append(os.path.relpath(dst, out_dir))
    return shown


def images(label: str, paths: Iterable[str]) -> list[str]:
    return [line for p in paths for line in (f"![{label}: {Path(p).stem}]({p})", "")]


@dataclass
class Study:
    """What the page is written from: each part's configurations, the main ones of each size, the
    full length (CLM's steps at size A) and the figures copied beside the page."""

    parts: dict[str, list[Entry]]
    sizes: dict[str, list[Entry]]
    steps: float
    plots: dict[str, list[str]]
    trends: dict[str, list[Trend]]   # per part: the configurations run at several lengths
    keep: float                      # the main keep

    def find(self, part: str, name: str) -> Entry | None:
        return next((e for e in self.sizes[part] if e.method == name), None)

    def first(self, part: str, name: str) -> Entry | None:
        return next((e for e in self.parts[part] if e.method == name), None)


def study(reports: dict[str, build.Report], out_dir: Path, main_keep: float) -> Study:
    parts = {part: entries(reports[part]) if part in reports else [] for part in PARTS}
    clm_a = [e for e in parts["methods_a"] if e.method == "clm"]
    steps = max((e.steps or 0) for e in clm_a) if clm_a else 0.0
    sizes = {part: main_rows(parts[part], steps, main_keep) for part in ("methods_a", "methods_b")}
    trends = {part: by_length(report.table, report.comparisons) for part, report in reports.items()}
    return Study(parts, sizes, steps, copy_plots(reports, out_dir), trends, main_keep)


def by_length_text(trends: Sequence[Trend], entry: Entry) -> str:
    """" By training length (Δ against CLM after the same steps): 200 steps +0.51 ± 0.01 (worse),
    1600 steps …" for a configuration run at several lengths; "" otherwise."""
    trend = next((t for t in trends for c in t.comparisons
                  if c.steps == entry.steps and method_name(c.row.runs[0].config).name == entry.name), None)
    if trend is None:
        return ""
    cells = [f"{c.steps:.0f} steps {delta(c.loss, c.same_steps)}" for c in trend.comparisons]
    return " By training length (Δ against CLM after the same steps): " + ", ".join(cells) + "."


def claims(s: Study) -> list[str]:
    """The verdict on each claim, from the numbers."""
    lines = ["## The claims, one by one", ""]
    for part in ("methods_a", "methods_b"):
        eslm, rnd = s.find(part, "eslm"), s.find(part, "random")
        if not eslm:
            continue
        trends = s.trends.get("lengths", []) if part == "methods_a" else s.trends.get(part, [])
        lines.append(f"- **ESLM: CLM's loss or better with fewer FLOPs ({PARTS[part][0]})**: "
                     + claim(eslm) + " Against random at the same keep, ESLM is "
                     + said(diff_between(eslm, rnd) if rnd else None, "better", "worse", "no different") + "."
                     + by_length_text(trends, eslm))
        lines += [f"  - {e.name}: {claim(e)}{by_length_text(trends, e)}" for e in s.sizes[part]
                  if e.method not in ("clm", "eslm", "random")]
        if kd := s.find(part, "eslm-kd"):
            lines.append(f"  - ESLM-KD against ESLM (the same selection, {PARTS[part][0]}): the teacher's targets "
                         "make it " + said(diff_between(kd, eslm), "better", "worse", "no different") + ".")
    lines += rho1_claim(s)
    if coco := s.first("coconts", "coconts"):
        reach = coco.against.steps_to_clm if coco.against else None
        lines.append("- **CoCoNTs converges faster than CLM**: it reaches CLM's final validation loss "
                     + ("never within the run" if reach is None else f"at step {reach:.0f} of {coco.steps:.0f}")
                     + "; its loss after the same steps is " + verdict_of(coco.delta("same_steps")) + ".")
    return [*lines, ""]


# ---- where each method pays off ---------------------------------------------------------------------

def settings(s: Study) -> list[tuple[str, list[Entry]]]:
    """Every setting in which the study compares methods with CLM, as (its short name, its main
    rows): size A at each training length (the lengths part, else the main runs and CoCoNTs), size B."""
    rows_a = s.parts["lengths"] or [*s.parts["methods_a"], *(e for e in s.parts["coconts"] if e.method == "coconts")]
    out = []
    for steps in sorted({e.steps for e in rows_a if e.steps}):
        rows = main_rows(rows_a, steps, s.keep)
        if any(e.against for e in rows):
            out.append((f"size A, {steps:.0f} steps", rows))
    if any(e.against for e in s.sizes["methods_b"]):
        out.append((f"size B, {s.steps:.0f} steps", s.sizes["methods_b"]))
    return out


def payoff_cell(e: Entry) -> tuple[str, bool]:
    """What a configuration gives in one setting, in the user's currencies: its Δ against CLM at the
    same realised FLOPs (judged beyond 2 SE) and the training time it takes to reach CLM's final
    loss; and whether it pays off there (better at the same realised FLOPs, or CLM's loss in less
    time than CLM)."""
    realised = word_of(e.delta("same_realized"))
    c = e.against
    sooner = bool(c and c.seconds_to_clm is not None and c.clm_seconds and c.seconds_to_clm < c.clm_seconds)
    parts = ["realised FLOPs: " + (realised or "outside CLM's budgets")]
    if c is not None and c.clm_seconds:
        parts.append("CLM's loss: never" if c.seconds_to_clm is None
                     else f"CLM's loss in {c.seconds_to_clm / c.clm_seconds:.0%} of CLM's time")
    return "; ".join(parts), realised == "better" or sooner


def trend_word(trend: Trend) -> str:
    """How the gap to CLM after the same steps moves from the shortest to the longest length:
    "narrows", "widens" (beyond 2 SE of the change) or "holds"."""
    (first, se1), (last, se2) = trend.deltas()[0], trend.deltas()[-1]
    if verdict(last - first, math.hypot(se1, se2), spread_known=True) == "no difference":
        return "holds"
    return "narrows" if abs(last) < abs(first) else "widens"


def pays_off(s: Study) -> list[str]:
    """"Where each method pays off": per method and setting, the verdict at the same realised FLOPs
    and the time to CLM's loss; then one line per method a researcher can act on."""
    where = settings(s)
    if not where:
        return []
    cells: dict[str, dict[str, tuple[str, bool]]] = {}
    for name, rows in where:
        for e in rows:
            if e.against is not None:
                label = method_name(e.config, warm_share=True).name
                cells.setdefault(label, {})[name] = payoff_cell(e)
    header = ["method", *(name for name, _ in where)]
    rows = [[label, *(by.get(name, ("not run", False))[0] for name, _ in where)] for label, by in cells.items()]
    trends = {t.label: t for t in s.trends.get("lengths", [])}
    lines = ["## Where each method pays off", "", prose.PAYS_OFF, "", table(header, rows, len(header)), ""]
    for label, by in cells.items():
        good = [name for name, (_, ok) in by.items() if ok]
        trend = trends.get(label)
        course = "" if trend is None else (
            f" Its gap to CLM after the same steps {trend_word(trend)} from {trend.steps[0]:.0f} to "
            f"{trend.steps[-1]:.0f} steps ({', '.join(f'{d:+.3f}' for d, _ in trend.deltas())}).")
        lines.append(f"- **{label}**: " + (f"pays off at {'; '.join(good)}." if good
                                           else "pays off in no setting of this study.") + course)
    return [*lines, *rho1_pays_off(s), ""]


def rho1_pays_off(s: Study) -> list[str]:
    """RHO-1's line: its loss on the clean held-out text against CLM after the same steps, at
    each length it ran."""
    by_steps = {e.steps: e for e in s.parts["rho1"] if e.method == "rho1"}
    clm = {e.steps: e for e in s.parts["rho1"] if e.method == "clm"}
    found = [(n, diff_between(by_steps[n], clm.get(n), WIKI)) for n in sorted(by_steps)]
    if not found:
        return []
    words = [f"{n:.0f} steps {word_of(d) or 'not measured'}" + (f" ({d[0]:+.3f})" if d else "") for n, d in found]
    good = [n for n, d in found if word_of(d) == "better"]
    return ["- **RHO-1 (on the noisy mixture, judged on clean held-out text)**: "
            + (f"pays off at {', '.join(f'{n:.0f} steps' for n in good)}" if good else "pays off at no length")
            + f" against CLM after the same steps ({'; '.join(words)}); it needs a reference model trained "
            "on clean text, whose cost is not counted."]


def rho1_claim(s: Study) -> list[str]:
    """RHO-1 on the noisy mixture against CLM and random, on the clean source and overall, at the
    main length; against CLM and random on RHO-1's window grid (clm-grid, random-grid) where the
    part has them; and the same at each other length it ran."""
    by_steps: dict[float, dict[str, Entry]] = {}
    for e in s.parts["rho1"]:
        by_steps.setdefault(e.steps, {})[e.method] = e
    main = s.steps if "rho1" in by_steps.get(s.steps, {}) else next((n for n in sorted(by_steps)
                                                                       if "rho1" in by_steps[n]), None)
    if main is None:
        return []

    def between(rho: dict[str, Entry], a: str, b: str, figure: str = "val_loss") -> str:
        return said(diff_between(rho[a], rho.get(b), figure), "better", "worse", "no different")

    rho = by_steps[main]
    lines = ["- **RHO-1 beats CLM and random on the clean target when the data is noisy**: on held-out clean "
             f"text (val loss wiki), RHO-1 against CLM is {between(rho, 'rho1', 'clm', WIKI)}, against random "
             f"{between(rho, 'rho1', 'random', WIKI)}. Over all three sources (noise included) it is "
             f"{between(rho, 'rho1', 'clm')} than CLM: it learns the target by leaving the rest out."]
    for steps in sorted(by_steps):
        rho, said_here = by_steps[steps], []
        if "rho1" not in rho:
            continue
        if steps != main:
            said_here.append(f"RHO-1 against CLM on the clean text is {between(rho, 'rho1', 'clm', WIKI)}")
        if "clm-grid" in rho:  # CLM on the very windows RHO-1 trains on: the window placement taken out
            grid_random = (f", against random on the grid {between(rho, 'rho1', 'random-grid', WIKI)}"
                           if "random-grid" in rho else "")
            said_here.append(f"against CLM on RHO-1's window grid, on the clean text RHO-1 is "
                             f"{between(rho, 'rho1', 'clm-grid', WIKI)}{grid_random}; CLM on the grid against CLM is "
                             f"{between(rho, 'clm-grid', 'clm', WIKI)}")
        if said_here:
            lines.append(f"  - After {steps:.0f} steps: " + "; ".join(said_here) + ".")
    return lines


def methods_part(s: Study) -> list[str]:
    """Part 1: every method against CLM at both sizes, the keep sweep and the trend with scale."""
    lines = ["## 1. ESLM, Ada-ESLM, ESLM-KD and random against CLM", "", prose.PART1, ""]
    for part in ("methods_a", "methods_b"):
        if s.sizes[part]:
            lines += [f"### {PARTS[part][0]}", "", methods_table(s.sizes[part]), ""]
            lines += downstream_lines(s.sizes[part], PARTS[part][0])
            lines += images(PARTS[part][0], s.plots.get(part, []))
    sweep, best = sweep_table(s.parts["methods_a"], s.steps)
    if best:
        lines += ["### Keep sweep (size A)", "", prose.KEEP_SWEEP, "", sweep, "",
                  "Best keep by mean validation loss: " + ", ".join(f"{m} {k:g}" for m, k in best.items()) + ".", ""]
    return [*lines, *length_part(s), "### Trend with scale", "", scale_text(s.sizes), ""]


def downstream_lines(rows: Sequence[Entry], where: str) -> list[str]:
    """The downstream table of ``rows`` with its heading line, or nothing without results."""
    downstream = downstream_table(rows)
    if not downstream:
        return []
    return [f"Downstream accuracy ({where}; `slm eval tasks=`), its Δ against CLM after the same steps judged "
            "beyond 2 standard errors:", "", downstream, ""]


def length_part(s: Study) -> list[str]:
    """Size A at every training length: Δ against CLM after the same steps by length (table and
    figure), then each longer length's methods table and downstream accuracy."""
    header, rows = length_text(s.trends.get("lengths", []))
    if not rows:
        return []
    lines = ["### Training length (size A)", "", LENGTH_NOTE, "", table(header, rows), "",
             *images("training length", s.plots.get("lengths", []))]
    for steps in sorted({e.steps for e in s.parts["lengths"]} - {s.steps}):
        at = main_rows(s.parts["lengths"], steps, s.keep)
        if at:
            lines += [f"#### {steps:.0f} steps", "", methods_table(at), "", *downstream_lines(at, f"{steps:.0f} steps")]
    return lines


def other_parts(s: Study) -> list[str]:
    """Parts 2 to 4: RHO-1 on the noisy mixture, CoCoNTs, and the runs' selection and throughput."""
    lines = []
    if s.parts["rho1"]:
        rows = [[e.name, keep_text(e), f"{e.steps:.0f}", f"{e.n}", e.pm(WIKI), e.pm("val_loss"),
                 pct(e.mean("flops_saved_frac_nominal"))] for e in sorted(s.parts["rho1"], key=lambda e: e.steps)]
        lines += ["## 2. RHO-1 on a noisy mixture", "", prose.PART2, "",
                  table(["method", "keep", "steps", "n", "val loss wiki (clean, held out)", "val loss (all sources)",
                         "saved nominal"], rows), "", *images("RHO-1", s.plots.get("rho1", []))]
    if s.first("coconts", "coconts"):
        rows = [e for e in s.parts["coconts"] if e.method in ("clm", "coconts") and e.steps == s.steps]
        lines += ["## 3. CoCoNTs against CLM", "", prose.PART3, "", methods_table(rows), "",
                  *images("CoCoNTs", s.plots.get("coconts", []))]
    # each run once: CoCoNTs' part without its CLM, the lengths part without the main length (size A's)
    shown = {p: [e for e in rows if (p != "coconts" or e.method == "coconts") and (p != "lengths" or e.steps != s.steps)]
             for p, rows in s.parts.items()}
    return [*lines, "## 4. Selected fraction, alpha and throughput", "", prose.PART4, "", runs_table(shown), ""]


def write_reports(root: Path) -> dict[str, build.Report]:
    """Each part's `slm report`, written into ROOT/reports/<part>/ (the parts whose first run folder
    exists, with those of its other folders that do)."""
    reports = {part: build.write(find_runs([str(root / d) for d in dirs if (root / d).is_dir()]), root / "reports" / part)
               for part, (_, dirs) in PARTS.items() if (root / dirs[0]).is_dir()}
    if not reports:
        raise SlmError(f"no runs under {root}: run scripts/reproduce_small.sh first (it writes "
                       f"{', '.join(d for _, dirs in PARTS.values() for d in dirs)} there)")
    return reports


def page(root: Path, reports: dict[str, build.Report], out: Path, command: str, main_keep: float,
         plans: dict[str, dict[str, Any] | str]) -> str:
    """docs/results.md (to be written to ``out``) from the parts' reports and the papers'-scale plans."""
    s = study(reports, out.parent, main_keep)
    clm_a = [e for e in s.parts["methods_a"] if e.method == "clm"]
    tokens = max((e.mean("train_tokens") or 0) for e in clm_a) if clm_a else 0.0
    corpus = corpus_tokens(root)
    lines = ["# Results: the papers' claims at small scale", "",
             f"Generated by `{command}` on {time.strftime('%Y-%m-%d')}, on {describe(machine())}; "
             f"{run_time(s.parts)}. Do not edit: rerun the script (docs/results.md is its output). Every figure is "
             f"the mean ± sample standard deviation over seeds; a difference counts only beyond {SIGNIFICANCE:g} "
             "standard errors of the difference, and is called \"no difference\" otherwise.", ""]
    lines += [*claims(s), *pays_off(s), "## Setup", "", prose.SETUP, "", *methods_part(s), *other_parts(s)]
    lines += ["## What this test can and cannot say", "",
              prose.LIMITS.format(tokens=si(tokens), passes=tokens / corpus if corpus else math.nan,
                                  corpus=f"{si(corpus)} tokens" if corpus else "unknown size"), ""]
    lines += ["## At the papers' scale", "", prose.SCALE, "", gpu_estimates(plans), "", prose.SCALE_AFTER, ""]
    lines += ["## Rerunning and scaling up", "", prose.RERUN, ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m slm_cli.report.results", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="scripts/reproduce_small.sh's output folder")
    parser.add_argument("out", type=Path, help="the page to write, e.g. docs/results.md")
    parser.add_argument("--command", default="scripts/reproduce_small.sh", help="the command named on the page")
    parser.add_argument("--keep", type=float, default=0.6, help="the main runs' keep (KEEP of the script)")
    parser.add_argument("--slm", default=str(Path(sys.executable).parent / "slm"), help="the slm that plans the runs")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    try:
        reports = write_reports(root)
    except SlmError as exc:
        sys.exit(f"{parser.prog}: error: {exc}")
    text = page(root, reports, args.out, args.command, args.keep, plans(args.slm, root / "plans"))
    atomic_write(args.out, lambda f: f.write(text.encode("utf-8")))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
