"""The results table of `slm report`: which config keys tell the runs apart, one row per
configuration aggregated over seeds (mean, sample standard deviation, n), and its CSV and markdown.

Only finished runs enter the aggregates; the others are counted in ``unfinished`` and listed by
the report with their status.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from slm_cli.report.runs import SOURCE_LOSS, Run, flatten
from slm_cli.text import duration

# Keys that never tell configurations apart: the seed is what a row aggregates over; paths, the
# resume checkpoint, loggers and progress display do not change what is trained.
IGNORED_PREFIXES = ("paths.", "logger.", "hydra.")
IGNORED_KEYS = {"seed", "ckpt_path", "trainer.enable_progress_bar", "data.num_workers", "data.num_proc"}
# A strategy's token budget: shown even where it only follows from the strategy's name (e.g.
# selection=random,eslm), because it is what the comparison is about.
BUDGET_KEYS = ("ratio", "alpha")

# (summary figure, column name in report.csv, heading in report.md). The realised FLOPs (what the
# code executed) lead; the nominal ones, the papers' accounting, stand beside them.
METRICS: list[tuple[str, str, str]] = [
    ("val_loss", "val_loss", "val loss"),
    ("val_ppl", "val_ppl", "val ppl"),
    ("steps", "steps", "steps"),
    ("train_tokens", "tokens", "tokens"),
    ("selected_frac", "selected_frac", "selected"),
    ("flops_realized", "flops_realized", "FLOPs (realised)"),
    ("flops_saved_frac_realized", "flops_saved_frac_realized", "FLOPs saved (realised)"),
    ("flops_nominal", "flops_nominal", "FLOPs (nominal, papers' accounting)"),
    ("flops_saved_frac_nominal", "flops_saved_frac_nominal", "FLOPs saved (nominal, papers' accounting)"),
    ("flops_clm", "flops_clm", "FLOPs CLM"),
    ("train_tokens_per_s", "tokens_per_s", "tokens/s"),
    ("wall_s", "wall_s", "wall"),
]


def keep_fraction(selection: Mapping[str, Any]) -> float | None:
    """The share of tokens a strategy keeps, from a run's selection config: random's and RHO-1's
    ``ratio``, ESLM's 1 − ``alpha``; None for CLM (every token) and Ada-ESLM (its α adapts). The
    one place the report derives a strategy's budget; it can become a call of the strategy's own
    answer (``Selection.keep_fraction``) without its callers changing."""
    def number(key: str) -> float | None:
        value = selection.get(key)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    name = selection.get("name")
    if name in ("random", "rho1") and (ratio := number("ratio")) is not None:
        return ratio
    if name == "eslm" and (alpha := number("alpha")) is not None:
        return round(1 - alpha, 6)  # 1 − 0.4 is 0.6000000000000001
    return None


def metrics(table: Table) -> list[tuple[str, str, str]]:
    """METRICS, plus a mixture's validation loss per source (val_loss_<source> in report.csv)."""
    sources = dict.fromkeys(f for row in table.rows for run in row.finished for f in run.figures
                            if f.startswith(SOURCE_LOSS))
    extra = [(f, f"val_loss_{f[len(SOURCE_LOSS):]}", f"val loss {f[len(SOURCE_LOSS):]}") for f in sources]
    return METRICS[:2] + extra + METRICS[2:]


@dataclass
class Row:
    """One configuration: its values of the config columns and its runs."""

    key: tuple[Any, ...]
    runs: list[Run] = field(default_factory=list)

    @property
    def finished(self) -> list[Run]:
        return [r for r in self.runs if r.finished]

    def stats(self, figure: str) -> tuple[float | None, float | None, int]:
        """Mean, sample standard deviation (None for one run) and count of a summary figure."""
        values = [r.figures[figure] for r in self.finished if figure in r.figures]
        values = [v for v in values if math.isfinite(v)]
        if not values:
            return None, None, 0
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


@dataclass
class Table:
    columns: list[str]       # the config keys that differ between runs (dotted)
    fixed: dict[str, Any]    # the keys every run shares (for the report's "held fixed" line)
    rows: list[Row]

    def label(self, row: Row, skip: Sequence[str] = ()) -> str:
        """A short name for a row: its config values, e.g. "eslm alpha=0.4"."""
        parts = []
        for column, value in zip(self.columns, row.key, strict=True):
            if column in skip or value is None:
                continue
            leaf = column.rsplit(".", 1)[-1]
            parts.append(str(value) if leaf == "name" else f"{leaf}={format_value(value)}")
        return " ".join(parts) or "all runs"


def _comparable(value: Any) -> Any:
    return repr(value) if isinstance(value, list | dict) else value


def config_columns(runs: Sequence[Run]) -> tuple[list[str], dict[str, Any]]:
    """The config keys whose values differ between runs, and the values of the others.

    A key of a group (``selection.score``, ``model.n_layer``) whose value follows from the group's
    ``name``, where that name differs, is left out: the name says it (except a budget, ratio/alpha).
    """
    flats = [flatten(r.config) for r in runs]
    keys = list(dict.fromkeys(k for flat in flats for k in flat))
    keys = [k for k in keys if k not in IGNORED_KEYS and not k.startswith(IGNORED_PREFIXES)]
    differing, fixed = [], {}
    for key in keys:
        values = {repr(flat.get(key, None)) for flat in flats}
        if len(values) > 1:
            differing.append(key)
        elif runs:
            fixed[key] = flats[0].get(key)
    names = {k.rsplit(".", 1)[0] for k in differing if k.endswith(".name") and "." in k}

    def follows_from_name(key: str) -> bool:
        group, _, leaf = key.rpartition(".")
        if group not in names or leaf == "name" or leaf in BUDGET_KEYS:
            return False
        seen: dict[Any, Any] = {}
        for flat in flats:
            name, value = _comparable(flat.get(f"{group}.name")), _comparable(flat.get(key))
            if seen.setdefault(name, value) != value:
                return False
        return True

    return [k for k in differing if not follows_from_name(k)], fixed


def build_table(runs: Sequence[Run]) -> Table:
    """One row per configuration, in the order configurations first appear among ``runs``."""
    columns, fixed = config_columns(runs)
    rows: dict[tuple[Any, ...], Row] = {}
    for run in runs:
        flat = flatten(run.config)
        key = tuple(_comparable(flat.get(c)) for c in columns)
        rows.setdefault(key, Row(key=key)).runs.append(run)
    return Table(columns=columns, fixed=fixed, rows=list(rows.values()))


# ---- CSV -------------------------------------------------------------------------------------

def csv_text(table: Table) -> str:
    """report.csv: config columns, n, unfinished, seeds, <metric>_mean / <metric>_std, runs."""
    header = [*table.columns, "n", "unfinished", "seeds"]
    shown = metrics(table)
    for _, name, _ in shown:
        header += [f"{name}_mean", f"{name}_std"]
    header.append("runs")
    out = io.StringIO(newline="")
    writer = csv.writer(out)
    writer.writerow(header)
    for row in table.rows:
        line: list[Any] = ["" if v is None else v for v in row.key]
        line += [len(row.finished), len(row.runs) - len(row.finished),
                 " ".join(str(r.seed) for r in row.finished)]
        for figure, _, _ in shown:
            mean, std, _ = row.stats(figure)
            line += ["" if mean is None else repr(mean), "" if std is None else repr(std)]
        line.append(";".join(str(r.dir) for r in row.runs))
        writer.writerow(line)
    return out.getvalue()


# ---- text formatting -------------------------------------------------------------------------

def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "" if value is None else str(value)


def si(value: float, digits: int = 3) -> str:
    """1.28e9 -> "1.28G"; for counts (tokens, FLOPs) of any size."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    prefixes = [(1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, "")]
    for i, (factor, suffix) in enumerate(prefixes):
        if abs(value) >= factor or factor == 1.0:
            # "#" keeps trailing zeros (1.20G beside 1.28G); not the lone point of "943."
            text = f"{value / factor:#.{digits}g}".rstrip(".")
            if "e" in text and i > 0:  # 999.9k rounds to 1.00e+03k: that is 1.00M
                text, suffix = f"{value / prefixes[i - 1][0]:#.{digits}g}".rstrip("."), prefixes[i - 1][1]
            return text + suffix
    return f"{value:g}"



def _one(figure: str, value: float) -> str:
    if figure.startswith("val_loss"):
        return f"{value:.4f}"
    if figure == "val_ppl":
        return f"{value:.2f}"
    if figure in ("selected_frac", "flops_saved_frac_nominal", "flops_saved_frac_realized"):
        return f"{100 * value:.1f}%"
    if figure == "steps":
        return f"{value:.0f}"
    if figure == "train_tokens_per_s":
        return f"{value:,.0f}"
    if figure == "wall_s":
        return duration(value)
    return si(value)


def cell(row: Row, figure: str) -> str:
    """"mean ± std" for the markdown and HTML tables (just the mean when the runs agree or n=1)."""
    mean, std, _ = row.stats(figure)
    if mean is None:
        return "–"
    if std is None or std == 0 or _one(figure, std) in ("0.0000", "0.00", "0", "0.0%", "0.0 s"):
        return _one(figure, mean)
    return f"{_one(figure, mean)} ± {_one(figure, std)}"


# Columns of the compact results table (md/html); report.csv has every figure.
SHOWN = [figure for figure, _, _ in METRICS if figure != "flops_clm"]


def results_rows(table: Table, run_name: Any) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the results table as text; ``run_name(run)`` names a run dir briefly."""
    every = metrics(table)
    headings = dict((figure, heading) for figure, _, heading in every)
    shown = SHOWN[:2] + [f for f, _, _ in every if f.startswith(SOURCE_LOSS)] + SHOWN[2:]
    header = [*table.columns, "n", *(headings[f] for f in shown), "runs"]
    rows = []
    for row in table.rows:
        unfinished = len(row.runs) - len(row.finished)
        n = f"{len(row.finished)}" + (f" (+{unfinished} unfinished)" if unfinished else "")
        rows.append([*(format_value(v) for v in row.key), n, *(cell(row, f) for f in shown),
                     " ".join(run_name(r) for r in row.runs)])
    return header, rows


def runs_rows(table: Table, run_name: Any) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-run table: every run with its status."""
    header = ["run", "status", "seed", "configuration", "val loss", "steps", "note"]
    rows = []
    for row in table.rows:
        for run in row.runs:
            f = run.figures
            rows.append([run_name(run), run.status, format_value(run.seed), table.label(row),
                         f"{f['val_loss']:.4f}" if "val_loss" in f else "–",
                         f"{f['steps']:.0f}" if "steps" in f else format_value(run.last_step()), run.note])
    return header, rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> str:
    """A GitHub markdown table; ``align`` has one letter per column, "l" or "r" (numbers)."""
    def esc(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    marks = ["---:" if i < len(align) and align[i] == "r" else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "|".join(marks) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
