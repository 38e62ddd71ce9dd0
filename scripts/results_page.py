"""Write docs/results.md from the reports of scripts/reproduce_small.sh.

    python scripts/results_page.py ROOT RESULTS.md [--keep K] [--command "..."]

ROOT is the script's output folder: ROOT/reports/<part>/ holds each part's `slm report` (report.csv,
against_clm.csv, PNG plots). The page states every figure with its spread and says per claim, from
the numbers, whether it reproduces: a difference counts only beyond twice its standard error
(slm_cli/report/matched.py). The plots are copied beside the page (img/results/). GPU-hour
estimates for the papers' scale come from `slm train +experiment=<name>_gpt2 dry_run=true`.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from slm_cli.outputs import atomic_write
from slm_cli.report.matched import SIGNIFICANCE, Point, verdict
from slm_cli.report.runs import read_metrics_csv
from slm_cli.report.table import si

PARTS = {"methods_a": "size A", "methods_b": "size B", "rho1": "RHO-1 mixture", "coconts": "CoCoNTs"}
PLOTS = {"methods_a": ["val_loss_vs_flops.png", "loss_vs_flops.png", "selection.png"],
         "methods_b": ["val_loss_vs_flops.png"], "rho1": ["val_loss_by_source.png"],
         "coconts": ["loss_vs_tokens.png"]}
GPT2_EXPERIMENTS = ["clm_gpt2", "eslm_gpt2", "ada_eslm_gpt2", "rho1_gpt2", "coconts_gpt2"]


# ---- reading the reports -------------------------------------------------------------------------

def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def num(row: dict[str, str], key: str) -> float | None:
    text = row.get(key, "")
    return float(text) if text not in ("", None) else None


def method(row: dict[str, str]) -> str:
    """A row's method name as the page uses it: eslm, eslm-entropy, eslm-kd, ada_eslm, random, clm, coconts, rho1."""
    name = row.get("selection.name", "") or "clm"
    if row.get("selection.score") == "entropy" and name in ("eslm", "ada_eslm"):
        name += "-entropy"
    target = row.get("target.name", "")
    if target == "kd":
        name += "-kd"
    elif target not in ("", "onehot"):
        name = target if name == "clm" else f"{name}+{target}"
    return name


def keep(row: dict[str, str]) -> float | None:
    """The budget as the share kept: ratio, or 1 − alpha (ESLM)."""
    if (ratio := num(row, "selection.ratio")) is not None and row.get("selection.name") in ("random", "rho1"):
        return ratio
    if (alpha := num(row, "selection.alpha")) is not None and row.get("selection.name") == "eslm":
        return round(1 - alpha, 6)
    return None


def steps_of(row: dict[str, str]) -> float | None:
    return num(row, "trainer.max_steps") or num(row, "steps_mean") or num(row, "steps")


def joined(report: list[dict[str, str]], against: list[dict[str, str]]) -> list[dict[str, str]]:
    """report.csv rows, each with its against_clm.csv figures (matched on the config columns)."""
    config = [k for k in (report[0] if report else {}) if "." in k]
    index = {tuple(r.get(k, "") for k in config): r for r in against}
    out = []
    for row in report:
        merged = dict(row)
        merged.update({k: v for k, v in index.get(tuple(row.get(k, "") for k in config), {}).items()
                       if k not in row})
        out.append(merged)
    return out


# ---- formatting ----------------------------------------------------------------------------------

def pm(mean: float | None, std: float | None, digits: int = 4) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std else "")


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def delta_cell(row: dict[str, str], name: str) -> str:
    diff, se = num(row, f"delta_{name}"), num(row, f"delta_{name}_se")
    if diff is None or se is None:
        return "–"
    return f"{diff:+.4f} ± {se:.4f} ({verdict(diff, se)})"


def table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> str:
    """A markdown table: the first ``text_columns`` left-aligned, the numbers right-aligned."""
    marks = ["---" if i < text_columns else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def diff_between(a: dict[str, str], b: dict[str, str], figure: str = "val_loss") -> tuple[float, float] | None:
    """a − b of a figure's means, with the standard error of the difference."""
    points = [None if (m := num(r, f"{figure}_mean")) is None
              else Point(m, num(r, f"{figure}_std") or 0.0, int(num(r, "n") or 1)) for r in (a, b)]
    return None if None in points else points[0].minus(points[1])


def said(diff_se: tuple[float, float] | None, better: str, worse: str, same: str) -> str:
    if diff_se is None:
        return "not measured"
    diff, se = diff_se
    word = verdict(diff, se)
    text = {"better": better, "worse": worse, "no difference": same}.get(word, word)
    return f"{text} (Δ {diff:+.4f} ± {se:.4f})"


# ---- the page's parts ----------------------------------------------------------------------------

ORDER = ["clm", "random", "eslm", "eslm-entropy", "ada_eslm", "eslm-kd"]


def main_rows(rows: list[dict[str, str]], steps: float, main_keep: float) -> list[dict[str, str]]:
    """The full-length rows at the main keep: one per method (the keep sweep's other keeps left out)."""
    full = [r for r in rows if steps_of(r) == steps and keep(r) in (None, main_keep)]
    return sorted(full, key=lambda r: ORDER.index(method(r)) if method(r) in ORDER else len(ORDER))


def keep_text(row: dict[str, str]) -> str:
    if (k := keep(row)) is not None:
        return f"{k:g}"
    return "adaptive" if row.get("selection.name") == "ada_eslm" else "all"


def methods_table(rows: list[dict[str, str]]) -> str:
    header = ["method", "keep", "n", "val loss", "Δ vs CLM, same steps", "Δ vs CLM, same nominal FLOPs",
              "Δ vs CLM, same realised FLOPs", "saved nominal", "saved realised", "steps to CLM's loss"]
    out = []
    for r in rows:
        reach = num(r, "steps_to_clm_loss")
        out.append([method(r), keep_text(r),
                    f"{num(r, 'n'):.0f}", pm(num(r, "val_loss_mean"), num(r, "val_loss_std")),
                    delta_cell(r, "same_steps"), delta_cell(r, "same_nominal"), delta_cell(r, "same_realized"),
                    pct(num(r, "flops_saved_frac_nominal_mean")), pct(num(r, "flops_saved_frac_realized_mean")),
                    "–" if method(r) == "clm" else ("never" if reach is None else f"{reach:.0f} of {steps_of(r):.0f}")])
    return table(header, out)


def sweep_table(rows: list[dict[str, str]], steps: float) -> tuple[str, dict[str, float]]:
    """val loss of random / ESLM / ESLM-entropy at each keep (full length), and each one's best keep."""
    found: dict[str, dict[float, dict[str, str]]] = {}
    for r in rows:
        if steps_of(r) == steps and keep(r) is not None and method(r) in ("random", "eslm", "eslm-entropy"):
            found.setdefault(method(r), {})[keep(r)] = r
    keeps = sorted({k for by in found.values() for k in by})
    out, best = [], {}
    for name, by in found.items():
        cells = []
        for k in keeps:
            r = by.get(k)
            cells.append("–" if r is None else f"{pm(num(r, 'val_loss_mean'), num(r, 'val_loss_std'))} (n={num(r, 'n'):.0f})")
        out.append([name, *cells])
        best[name] = min(by, key=lambda k: num(by[k], "val_loss_mean") or math.inf)
    return table(["method", *(f"keep {k:g}" for k in keeps)], out), best


def alpha_of(run_dir: str) -> tuple[float | None, float | None]:
    """(mean, final) selection/alpha of a run from its metrics.csv."""
    for name in ("metrics.csv", "csv/metrics.csv"):
        path = Path(run_dir) / name
        if path.is_file():
            values = read_metrics_csv(path).get("selection/alpha", ([], []))[1]
            if values:
                return sum(values) / len(values), values[-1]
    return None, None


def runs_table(parts: dict[str, list[dict[str, str]]], root: Path) -> str:
    header = ["part", "method", "keep", "steps", "n", "selected", "alpha (mean; final)", "tokens/s", "wall"]
    out = []
    for part, rows in parts.items():
        for r in rows:
            alphas = [alpha_of(d if os.path.isabs(d) else str(root / d)) for d in r.get("runs", "").split(";") if d]
            alphas = [a for a in alphas if a[0] is not None]
            alpha = "–" if not alphas else (f"{sum(a[0] for a in alphas) / len(alphas):.3f}; "
                                            f"{sum(a[1] for a in alphas) / len(alphas):.3f}")
            out.append([PARTS[part], method(r), keep_text(r), f"{steps_of(r):.0f}",
                        f"{num(r, 'n'):.0f}", pct(num(r, "selected_frac_mean")), alpha,
                        pm(num(r, "tokens_per_s_mean"), num(r, "tokens_per_s_std"), 0),
                        f"{(num(r, 'wall_s_mean') or 0):.0f} s"])
    return table(header, out, text_columns=2)


def gpu_estimates(slm: str) -> str:
    """Total FLOPs and GPU-days of the papers'-scale experiments, from slm's own dry run."""
    rows = []
    for name in GPT2_EXPERIMENTS:
        try:
            out = subprocess.run([slm, "train", f"+experiment={name}", "dry_run=true"], capture_output=True,
                                 text=True, timeout=300, check=True).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            rows.append([name, "–", "–", "–", "–", f"dry run failed: {exc}"])
            continue
        flops = re.search(r"in total ([0-9.e+]+) nominal, ([0-9.e+]+) realised", out)
        tokens = re.search(r"budget\s+([0-9,]+) steps, ([0-9,]+) tokens", out)
        eta = {m.group(1): m.group(2) for m in re.finditer(r"(H100 SXM|A100) ([0-9.]+ days|[0-9.]+ h)", out)}
        rows.append([f"`{name}`", tokens.group(2) if tokens else "–",
                     f"{float(flops.group(1)):.3g}" if flops else "–", f"{float(flops.group(2)):.3g}" if flops else "–",
                     eta.get("A100", "–"), eta.get("H100 SXM", "–")])
    return table(["experiment", "tokens", "FLOPs nominal", "FLOPs realised", "1 A100", "1 H100"], rows)


# ---- the page ------------------------------------------------------------------------------------

def corpus_tokens(root: Path) -> float:
    """Training tokens of the main corpus (its prepared meta.json), 0 if not found."""
    import json

    for meta in sorted((root / "data").glob("*/meta.json")):
        name = meta.parent.name  # not the mixture, its sources (<name>.tok-<sha>) or the reference's text
        if "mix" not in name and ".tok-" not in name and "test" not in name:
            return float(json.loads(meta.read_text()).get("train_tokens", 0))
    return 0.0


def run_time(reports: dict[str, list[dict[str, str]]], root: Path) -> str:
    """How many runs the reports hold, their summed wall time (each run counted once), and the
    wall-clock from the first run's start to the last run's end (from the run dirs' files, so
    that a rerun which only rewrites the reports does not count)."""
    seen: dict[str, tuple[float, float]] = {}
    dirs: set[Path] = set()
    for rows in reports.values():
        for r in rows:
            seen[r.get("runs", "")] = (num(r, "n") or 0, (num(r, "wall_s_mean") or 0) * (num(r, "n") or 0))
            dirs |= {Path(d) if os.path.isabs(d) else root / d for d in r.get("runs", "").split(";") if d}
    runs, seconds = sum(n for n, _ in seen.values()), sum(s for _, s in seen.values())
    starts = [(d / ".hydra" / "config.yaml").stat().st_mtime for d in dirs if (d / ".hydra" / "config.yaml").is_file()]
    ends = [(d / "summary.json").stat().st_mtime for d in dirs if (d / "summary.json").is_file()]
    clock = f", {(max(ends) - min(starts)) / 60:.0f} min from the first start to the last end" if starts and ends else ""
    return f"{runs:.0f} training runs, {seconds / 60:.0f} min of training in all (two at a time){clock}"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} cores, no GPU; Python {platform.python_version()}, torch {torch.__version__}"


def copy_plots(root: Path, out_dir: Path) -> dict[str, list[str]]:
    img = out_dir / "img" / "results"
    img.mkdir(parents=True, exist_ok=True)
    shown: dict[str, list[str]] = {}
    for part, names in PLOTS.items():
        for name in names:
            src = root / "reports" / part / name
            if src.is_file():
                dst = img / f"{part}-{name}"
                shutil.copyfile(src, dst)
                shown.setdefault(part, []).append(os.path.relpath(dst, out_dir))
    return shown


def page(root: Path, out: Path, command: str, slm: str, main_keep: float) -> str:
    reports = {part: joined(read_csv(root / "reports" / part / "report.csv"),
                            read_csv(root / "reports" / part / "against_clm.csv")) for part in PARTS}
    plots = copy_plots(root, out.parent)
    clm_a = [r for r in reports["methods_a"] if method(r) == "clm"]
    steps = max((steps_of(r) or 0) for r in clm_a) if clm_a else 0.0
    sizes = {part: main_rows(reports[part], steps, main_keep) for part in ("methods_a", "methods_b")}

    def find(part: str, name: str) -> dict[str, str] | None:
        return next((r for r in sizes[part] if method(r) == name), None)

    lines = ["# Results: the papers' claims at small scale", "",
             f"Generated by `{command}` on {time.strftime('%Y-%m-%d')}" + f", on {machine()}; {run_time(reports, root)}. "
             "Do not edit: rerun the script (docs/results.md is its output). Every figure is the mean ± sample "
             f"standard deviation over seeds; a difference counts only beyond {SIGNIFICANCE:g} standard errors of "
             "the difference, and is called \"no difference\" otherwise.", ""]

    # ---- verdicts -------------------------------------------------------------------------------
    lines += ["## The claims, one by one", ""]
    for part in ("methods_a", "methods_b"):
        eslm, rnd = find(part, "eslm"), find(part, "random")
        if not eslm:
            continue
        lines.append(f"- **ESLM: CLM's loss or better with fewer FLOPs ({PARTS[part]})**: "
                     + claim(eslm) + " Against random at the same keep, ESLM is "
                     + said(diff_between(eslm, rnd) if rnd else None, "better", "worse", "no different") + ".")
        for name in ("eslm-entropy", "ada_eslm", "eslm-kd"):
            r = find(part, name)
            if r:
                lines.append(f"  - {name}: {claim(r)}")
        kd = find(part, "eslm-kd")
        if kd:
            lines.append(f"  - ESLM-KD against ESLM (the same selection, {PARTS[part]}): the teacher's targets make it "
                         + said(diff_between(kd, eslm), "better", "worse", "no different") + ".")
    rho = {method(r): r for r in reports["rho1"]}
    if "rho1" in rho:
        lines.append("- **RHO-1 beats CLM and random on the clean target when the data is noisy**: on held-out clean "
                     "text (val loss wiki), RHO-1 against CLM is "
                     + said(diff_between(rho["rho1"], rho.get("clm", {}), "val_loss_wiki"), "better", "worse",
                            "no different")
                     + ", against random " + said(diff_between(rho["rho1"], rho.get("random", {}), "val_loss_wiki"),
                                                  "better", "worse", "no different")
                     + ". Over all three sources (noise included) it is "
                     + said(diff_between(rho["rho1"], rho.get("clm", {})), "better", "worse", "no different")
                     + " than CLM: it learns the target by leaving the rest out.")
    coco = next((r for r in reports["coconts"] if method(r) == "coconts"), None)
    if coco:
        reach = num(coco, "steps_to_clm_loss")
        lines.append("- **CoCoNTs converges faster than CLM**: it reaches CLM's final validation loss "
                     + ("never within the run" if reach is None else f"at step {reach:.0f} of {steps_of(coco):.0f}")
                     + "; its loss after the same steps is " + verdict_of(coco, "same_steps") + ".")
    lines.append("")

    # ---- setup and tables -----------------------------------------------------------------------
    lines += ["## Setup", "", SETUP, ""]
    lines += ["## 1. ESLM, Ada-ESLM, ESLM-KD and random against CLM", "", PART1, ""]
    for part in ("methods_a", "methods_b"):
        if sizes[part]:
            lines += [f"### {PARTS[part]}", "", methods_table(sizes[part]), ""]
            lines += [line for p in plots.get(part, []) for line in (f"![{PARTS[part]}: {Path(p).stem}]({p})", "")]
    sweep, best = sweep_table(reports["methods_a"], steps)
    if best:
        lines += ["### Keep sweep (size A)", "", KEEP_SWEEP, "", sweep, "",
                  "Best keep by mean validation loss: " + ", ".join(f"{m} {k:g}" for m, k in best.items()) + ".", ""]
    lines += ["### Trend with scale", "", scale_text(sizes), ""]
    if reports["rho1"]:
        lines += ["## 2. RHO-1 on a noisy mixture", "", PART2, "",
                  table(["method", "keep", "n", "val loss wiki (clean, held out)", "val loss (all sources)",
                         "saved nominal"],
                        [[method(r), keep_text(r), f"{num(r, 'n'):.0f}",
                          pm(num(r, "val_loss_wiki_mean"), num(r, "val_loss_wiki_std")),
                          pm(num(r, "val_loss_mean"), num(r, "val_loss_std")),
                          pct(num(r, "flops_saved_frac_nominal_mean"))] for r in reports["rho1"]]), ""]
        lines += [line for p in plots.get("rho1", []) for line in (f"![RHO-1: {Path(p).stem}]({p})", "")]
    if coco:
        lines += ["## 3. CoCoNTs against CLM", "", PART3, "", methods_table([r for r in reports["coconts"]
                                                                              if method(r) in ("clm", "coconts")
                                                                              and steps_of(r) == steps]), ""]
        lines += [line for p in plots.get("coconts", []) for line in (f"![CoCoNTs: {Path(p).stem}]({p})", "")]
    lines += ["## 4. Selected fraction, alpha and throughput", "", PART4, "",
              runs_table({p: [r for r in reports[p] if p != "coconts" or method(r) == "coconts"] for p in PARTS}, root),
              ""]
    tokens = max((num(r, "tokens_mean") or 0) for r in clm_a) if clm_a else 0.0
    corpus = corpus_tokens(root)
    lines += ["## What this test can and cannot say", "",
              LIMITS.format(tokens=si(tokens), passes=tokens / corpus if corpus else math.nan,
                            corpus=f"{si(corpus)} tokens" if corpus else "unknown size"), ""]
    lines += ["## At the papers' scale", "", SCALE, "", gpu_estimates(slm), "", SCALE_AFTER, ""]
    lines += ["## Rerunning and scaling up", "", RERUN, ""]
    return "\n".join(lines)


def claim(row: dict[str, str]) -> str:
    """Does a strategy reach CLM's loss (or better) with fewer FLOPs? From its three comparisons."""
    words = {name: word_of(row, name) for name in ("same_steps", "same_nominal", "same_realized")}
    saved = num(row, "flops_saved_frac_nominal_mean")
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
    return (f"{head}. Same steps: {verdict_of(row, 'same_steps')}; same nominal FLOPs: "
            f"{verdict_of(row, 'same_nominal')}; same realised FLOPs: {verdict_of(row, 'same_realized')}.")


def word_of(row: dict[str, str], name: str) -> str | None:
    diff, se = num(row, f"delta_{name}"), num(row, f"delta_{name}_se")
    return None if diff is None or se is None else verdict(diff, se)


def verdict_of(row: dict[str, str], name: str) -> str:
    diff, se = num(row, f"delta_{name}"), num(row, f"delta_{name}_se")
    if diff is None or se is None:
        return "not comparable (outside CLM's budgets)"
    word = verdict(diff, se)
    text = {"better": "better than CLM", "worse": "worse than CLM",
            "no difference": "no different from CLM"}.get(word, word)
    return f"{text} (Δ loss {diff:+.4f} ± {se:.4f})"


def scale_text(sizes: dict[str, list[dict[str, str]]]) -> str:
    out = []
    for name in ("random", "eslm", "eslm-entropy", "ada_eslm", "eslm-kd"):
        cells = []
        for key in ("delta_same_steps", "delta_same_nominal"):
            for part in ("methods_a", "methods_b"):
                r = next((x for x in sizes[part] if method(x) == name), None)
                d = num(r, key) if r else None
                cells.append("–" if d is None else f"{d:+.4f}")
        out.append([name, *cells])
    return ("Δ validation loss against CLM at each size, after the same steps and at the same nominal FLOPs "
            "(negative: the method is ahead). Two sizes a factor of about four apart in parameters can show a "
            "direction, not a scaling law.\n\n"
            + table(["method", "same steps, size A", "same steps, size B", "same nominal FLOPs, size A",
                     "same nominal FLOPs, size B"], out))


SETUP = """- **Corpus**: WikiText-2 (the vendored validation split, 290k training tokens after a seeded 5% of
  its lines is held out; 4096-token BPE), 128-token windows, 16 windows per step. Validation loss is on
  the held-out lines, 10 times per run.
- **Sizes**: A = `gpt2-nano` (4 layers, 4 heads, d = 128), B = the same with d = 256 (4× the
  non-embedding parameters). AdamW, warmup 20 steps, cosine decay to the run's last step.
- **Methods** at keep 0.6 (ESLM α = 0.4; random and RHO-1 ratio 0.6); Ada-ESLM from α = 0.5 with its
  adaptive rule; ESLM-KD is ESLM at α = 0.4 with `target=kd` (top 64 teacher probabilities, weight 0.5).
  The teacher is size B trained with CLM for twice the steps: a larger teacher for size A, the same size
  trained longer for size B.
- **CLM at fewer steps** (0.4, 0.6 and 0.8 of them, each with its own full schedule) gives CLM's loss
  at other budgets: a method is compared with CLM interpolated at its own nominal and at its realised
  FLOPs (linear in log FLOPs, never extrapolated; `slm report`'s "against CLM" table).
- **Seeds**: 3 per configuration (the keep sweep: 1). Runs go two at a time, one thread each, so
  tokens/s is per run with another beside it."""

PART1 = """Nominal FLOPs are the papers' accounting (the backward pass counted for the selected tokens
only); realised FLOPs are what slm executes (the trunk's backward stays dense; docs/flops.md).
"saved" is relative to CLM on the same tokens."""

KEEP_SWEEP = """Validation loss after the full steps at each keep (the share of tokens trained on): where
each method does best. The keep-0.6 column is the 3-seed main run."""

PART2 = """The training mixture: 50% clean WikiText-2, 30% the same text with the words of each line in a
random order (the words of the language without the language), 20% Tiny Shakespeare (another domain).
The reference is size A trained with CLM on WikiText-2's test split, clean text that no run trains
or validates on; `slm score` scores the mixture with it, and RHO-1 keeps the 60% of each batch with
the highest excess loss. "val loss wiki" is the loss on held-out clean WikiText-2 lines, the target
domain; "val loss" averages all three sources. The reference's cost (its training and the scoring
pass) is not in the FLOPs."""

PART3 = """CoCoNTs (n = 4, r = 8, weight 0.5) trains every token towards a mixture of its label and the
stored 4-gram next-token distribution. "Steps to CLM's loss" is the first step at which its mean
validation curve reaches CLM's final loss (linear between the 10 validation points)."""

PART4 = """Per configuration: the share of tokens trained on, ESLM's α (constant) or Ada-ESLM's (mean over the
run; final), and the training throughput (two runs side by side on 2 cores)."""

LIMITS = """- **Scale.** The default sizes have 0.8M and 3M non-embedding parameters, and each run sees
  {tokens} training tokens, {passes:.1f} passes over a corpus of {corpus}. The papers' claims are about GPT-2-size models and billions of
  tokens; a method that needs a trained model to pick tokens well (ESLM scores with the model being
  trained) may behave differently when the model is this weak for this long. A verdict here is a
  verdict at this scale.
- **Repetition.** With more than one pass over the corpus, a token trained on in one pass comes back
  in the next: selection then partly decides *when* a token is learned, not only *whether*.
- **Noise.** Three seeds give the spread of the mean to within a factor of about two; differences
  below twice their standard error are reported as no difference, not as equality.
- **Our choices.** Ada-ESLM's rule and ESLM-KD's loss are slm's readings of the paper (the rule is
  not published; docs/methods.md). The ESLM-KD teacher is small (size B, twice the steps). The
  RHO-1 noise is synthetic (shuffled words) plus another domain, and the reference learns from
  one small split of clean text (WikiText-2's test split).
- **Cost.** Realised FLOPs are what slm executes on a CPU-shaped implementation: the trunk's
  backward pass stays dense, so selection saves less than its nominal FLOPs (docs/flops.md), and
  wall-clock saves less again (docs/benchmarks.md)."""

SCALE = """ESLM reports its gains on GPT-2 pretraining; RHO-1 on 1.1B and 7B models. slm's `*_gpt2`
experiments are the GPT-2 124M recipe on OpenWebText (nanoGPT's 600k steps of 491,520 tokens).
`slm train +experiment=<name> dry_run=true` gives their FLOPs from slm's own accounting and their
time on one GPU at 40% MFU (divide by the GPU count for a node). Realised FLOPs include the scoring
forward pass that global selection needs with accumulation (docs/scaling.md); RHO-1's reference
training and scoring, and ESLM-KD's teacher, come on top."""

SCALE_AFTER = """One seed of one method is the GPU-days above, about a day or more on an 8-GPU node; the
comparison above (six methods × 3 seeds, CLM at four budgets, two sizes) is two orders of magnitude
more. A first test at scale would be
CLM, ESLM and random at one seed on GPT-2 124M with a 10B-token budget (about 1/30 of the full
recipe)."""

RERUN = """```bash
make install
SLM=.venv/bin/slm scripts/reproduce_small.sh            # about 70 min on 2 cores; writes docs/results.md
```

The script skips every run that already has its summary, so an interrupted run continues where it
stopped. Everything scales through its settings and overrides: sizes (`SIZE_A`, `SIZE_B`), corpus
(`DATA`), batch (`BATCH`), length (`STEPS`), seeds (`SEEDS`), keeps (`KEEPS`, `KEEP`, `RATIO`), and
any `slm train` override after the options, e.g. `trainer=ddp` or `hydra/launcher=slurm`
(`scripts/reproduce_small.sh -h`)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--command", default="scripts/reproduce_small.sh")
    parser.add_argument("--keep", type=float, default=0.6, help="the main runs' keep (KEEP of the script)")
    parser.add_argument("--slm", default=str(Path(sys.executable).parent / "slm"))
    args = parser.parse_args()
    if not (args.root / "reports").is_dir():
        sys.exit(f"results_page.py: error: no reports under {args.root}: run scripts/reproduce_small.sh first")
    text = page(args.root.resolve(), args.out, args.command, args.slm, args.keep)
    atomic_write(args.out, lambda f: f.write(text.encode("utf-8")))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
