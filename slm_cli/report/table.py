"""The results table of `slm report`: which config keys tell the runs apart, one row per
configuration aggregated over seeds (mean, sample standard deviation, n), and its CSV and markdown.

Only finished runs enter the aggregates; the others are counted in ``unfinished`` and listed by
the report with their status.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from slm_cli.report.runs import ACCURACY, SOURCE_LOSS, Run, flatten
from slm_cli.text import duration

# Keys that never tell configurations apart: the seed is what a row aggregates over; the rest is
# bookkeeping (paths, the run's name, the resume checkpoint, loggers and W&B ids, progress display,
# how often to log, validate or checkpoint, data loading workers, memory checks, a dry run's plan),
# which does not change what is trained or what its final figures measure.
IGNORED_PREFIXES = ("paths.", "logger.", "hydra.")
IGNORED_KEYS = {"seed", "ckpt_path", "task_name", "dry_run", "plan_out", "trainer.enable_progress_bar",
                "trainer.log_every_n_steps", "trainer.val_check_interval", "trainer.checkpoint_every_n_steps",
                "trainer.check_memory", "trainer.export_at_end", "data.num_workers", "data.num_proc"}
# A strategy's token budget: shown even where it only follows from the strategy's name (e.g.
# selection=random,eslm), because it is what the comparison is about.
BUDGET_KEYS = ("ratio", "alpha", "window_alpha")

# (summary figure, column name in report.csv, heading in report.md). The realised FLOPs (what the
# code executed) lead; the nominal ones, the papers' accounting, stand beside them.
METRICS: list[tuple[str, str, str]] = [
    ("val_loss", "val_loss", "val loss"),
    ("val_ppl", "val_ppl", "val ppl"),
    ("steps", "steps", "steps"),
    ("train_tokens", "tokens", "tokens"),
    ("selected_frac", "selected_frac", "selected"),
    ("forward_frac", "forward_frac", "run forward"),
    ("flops_realized", "flops_realized", "FLOPs (realised)"),
    ("flops_saved_frac_realized", "flops_saved_frac_realized", "FLOPs saved (realised)"),
    ("flops_nominal", "flops_nominal", "FLOPs (nominal, papers' accounting)"),
    ("flops_saved_frac_nominal", "flops_saved_frac_nominal", "FLOPs saved (nominal, papers' accounting)"),
    ("flops_clm", "flops_clm", "FLOPs CLM"),
    ("train_tokens_per_s", "tokens_per_s", "tokens/s"),
    ("wall_s", "wall_s", "wall"),
]


def _number(config: Mapping[str, Any], key: str) -> float | None:
    value = config.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def keep_fraction(selection: Mapping[str, Any]) -> float | None:
    """The share of the tokens it scores that a strategy trains on, from a run's selection config:
    random's and RHO-1's ``ratio``, ESLM's 1 − ``alpha``, and Hierarchical ESLM's 1 − ``alpha`` of
    the tokens of the windows it keeps (:func:`window_keep`: their share); None for CLM (every
    token) and Ada-ESLM (its α adapts). The strategies answer the same
    (``Selection.keep_fraction``); this reads it from a run dir's config, without building them."""
    name = selection.get("name")
    if name in ("random", "rho1") and (ratio := _number(selection, "ratio")) is not None:
        return ratio
    if name in ("eslm", "hier_eslm") and (alpha := _number(selection, "alpha")) is not None:
        return round(1 - alpha, 6)  # 1 − 0.4 is 0.6000000000000001
    return None


def window_keep(selection: Mapping[str, Any]) -> float | None:
    """Hierarchical ESLM's share of each micro-batch's windows that run the full forward and
    backward, 1 − ``window_alpha`` (``Selection.window_keep_fraction``); None for the others."""
    if selection.get("name") == "hier_eslm" and (alpha := _number(selection, "window_alpha")) is not None:
        return round(1 - alpha, 6)
    return None


# ---- a configuration's name, as a reader says it -------------------------------------------------

STRATEGIES = {"clm": "CLM", "random": "Random", "eslm": "ESLM", "ada_eslm": "Ada-ESLM",
              "hier_eslm": "Hierarchical ESLM", "rho1": "RHO-1"}
TARGETS = {"kd": "KD", "coconts": "CoCoNTs", "allnts": "AllNTs"}


@dataclass(frozen=True)
class Method:
    """A configuration's method in a reader's words: its family ("ESLM", "ESLM-KD"), what ranks
    its tokens ("loss"), its budget ("keep 0.6"), and the settings around it (" warm start 100");
    ``keys``: the flat config keys the name states."""

    family: str
    score: tuple[str, ...] = ()
    budget: tuple[str, ...] = ()
    suffix: str = ""
    keys: frozenset[str] = frozenset()

    @property
    def name(self) -> str:
        """"ESLM (loss, keep 0.6) warm start 100"."""
        inside = ", ".join((*self.score, *self.budget))
        return self.family + (f" ({inside})" if inside else "") + self.suffix

    @property
    def series(self) -> str:
        """The name without the budget: the method whose budgets one curve of points joins."""
        inside = ", ".join(self.score)
        return self.family + (f" ({inside})" if inside else "") + self.suffix


def method_name(config: Mapping[str, Any], warm_share: bool = False) -> Method:
    """A run's method from its config (nested, or flat with dotted keys): "CLM", "Random (keep 0.6)",
    "ESLM (entropy, keep 0.6)", "Ada-ESLM (loss)", "Hierarchical ESLM (loss, windows 0.5, keep 0.6)",
    "RHO-1 (excess, keep 0.6)", "CoCoNTs", "ESLM-KD (loss, keep 0.6)"; with " warm start N" when
    selection starts after N CLM steps (``warm_share``: " warm start 25% of steps", the same warm
    start at every training length), and " on RHO-1's grid" when a baseline's windows start on the
    multiples of the context (RHO-1's scoring grid)."""
    flat = flatten(dict(config))
    selection = {k[len("selection."):]: v for k, v in flat.items() if k.startswith("selection.")}
    strategy, target = selection.get("name") or "clm", flat.get("target.name") or "onehot"
    keys = {"selection.name", "target.name"}
    if strategy == "eslm" and target == "kd":
        family = "ESLM-KD"
    elif target != "onehot":
        label = TARGETS.get(target, str(target))
        family = label if strategy == "clm" else f"{STRATEGIES.get(strategy, strategy)} + {label}"
    else:
        family = STRATEGIES.get(strategy, str(strategy))
    score = (str(selection["score"]),) if selection.get("score") is not None else ()
    keys |= {"selection.score"} if score else set()
    budget = []
    if (windows := window_keep(selection)) is not None:
        budget.append(f"windows {windows:g}")
        keys.add("selection.window_alpha")
    if (keep := keep_fraction(selection)) is not None:
        budget.append(f"keep {keep:g}")
        keys.add("selection.ratio" if strategy in ("random", "rho1") else "selection.alpha")
    suffix = _setting_suffix(flat, strategy, warm_share)
    return Method(family, score, tuple(budget), suffix, frozenset(keys | SETTING_KEYS))


SETTING_KEYS = frozenset({"trainer.selection_start_step", "data.window_grid"})


def _setting_suffix(flat: Mapping[str, Any], strategy: str, warm_share: bool = False) -> str:
    """" warm start 100" (CLM before that step; ``warm_share``: as a share of trainer.max_steps),
    " on RHO-1's grid" (windows on the multiples of the context, where RHO-1's stored scores lie;
    RHO-1 itself always trains there)."""
    suffix = ""
    start, steps = _number(flat, "trainer.selection_start_step"), _number(flat, "trainer.max_steps")
    if strategy != "clm" and start:
        suffix += f" warm start {100 * start / steps:.3g}% of steps" if warm_share and steps else f" warm start {start:g}"
    grid = flat.get("data.window_grid")
    if strategy != "rho1" and grid is not None:
        suffix += " on RHO-1's grid" if grid == flat.get("model.block_size") else f" on a {grid}-token grid"
    return suffix


def figures_named(rows: Sequence[Row], prefix: str) -> list[str]:
    """The figures of the finished runs of ``rows`` whose name starts with ``prefix`` (a mixture's
    ``val_loss:<source>``, a downstream task's ``acc:<task>``), in order of appearance."""
    return list(dict.fromkeys(f for row in rows for run in row.finished for f in run.figures
                              if f.startswith(prefix)))


def metrics(table: Table) -> list[tuple[str, str, str]]:
    """METRICS, plus a mixture's validation loss per source (val_loss_<source> in report.csv) and
    the downstream accuracy per task (acc_<task>)."""
    sources = [(f, f"val_loss_{f[len(SOURCE_LOSS):]}", f"val loss {f[len(SOURCE_LOSS):]}")
               for f in figures_named(table.rows, SOURCE_LOSS)]
    tasks = [(f, f"acc_{f[len(ACCURACY):]}", f"acc {f[len(ACCURACY):]}") for f in figures_named(table.rows, ACCURACY)]
    return METRICS[:2] + sources + METRICS[2:] + tasks


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
    _labels_cache: dict[tuple, dict[int, str]] = field(default_factory=dict, repr=False, compare=False)

    def method(self, row: Row, warm_share: bool = False) -> Method:
        return method_name(row.runs[0].config, warm_share)

    def label(self, row: Row, skip: Sequence[str] = (), budget: bool = True, warm_share: bool = False) -> str:
        """A row's name for a reader: its method ("ESLM (loss, keep 0.6)"), and the config values
        that tell it apart from the other rows of the same method ("ESLM (loss, keep 0.6), 400
        steps"). ``skip``: columns left out; ``budget=False``: the method without its budget;
        ``warm_share``: a warm start as a share of the steps (the same at every length)."""
        cache = (tuple(skip), budget, warm_share)
        if cache not in self._labels_cache:
            self._labels_cache[cache] = self._labels(*cache)
        return self._labels_cache[cache][id(row)]

    def _labels(self, skip: tuple[str, ...], budget: bool, warm_share: bool) -> dict[int, str]:
        """Each row's label by id: rows of one method name are told apart by the columns that
        differ among them (not those the name states)."""
        methods = {id(row): self.method(row, warm_share) for row in self.rows}
        groups: dict[str, list[Row]] = {}
        for row in self.rows:
            m = methods[id(row)]
            groups.setdefault(m.name if budget else m.series, []).append(row)
        out = {}
        for base, rows in groups.items():
            own = methods[id(rows[0])].keys
            differing = [i for i, c in enumerate(self.columns) if c not in skip and c not in own
                         and len({repr(r.key[i]) for r in rows}) > 1]
            for row in rows:
                parts = [_setting(self.columns[i], row.key[i], self.columns) for i in differing if row.key[i] is not None]
                out[id(row)] = ", ".join([base, *parts])
        return out


# How a setting reads beside a method name, for the keys a reader knows without their key.
READABLE = {"trainer.max_steps": "{} steps", "trainer.max_tokens": "{} tokens", "model.name": "{}", "data.name": "{}"}


def _setting(column: str, value: Any, columns: Sequence[str]) -> str:
    """One config value in a label: "400 steps", "gpt2-micro", or "lr=0.001" (the full key when
    another column has the same last part)."""
    if column in READABLE:
        return READABLE[column].format(format_value(value))
    leaf = column.rsplit(".", 1)[-1]
    name = column if sum(c.rsplit(".", 1)[-1] == leaf for c in columns) > 1 else leaf
    return f"{name}={format_value(value)}"


def _comparable(value: Any) -> Any:
    return repr(value) if isinstance(value, list | dict) else value


def _group_default(group: str, name: Any, leaf: str) -> tuple[bool, Any]:
    """(found, value) of ``leaf`` in conf/<group>/<name>.yaml, the package's config group file."""
    if not isinstance(name, str) or "." in group or not name.replace("-", "").replace("_", "").isalnum():
        return False, None
    defaults = _group_file(group, name)
    return (leaf in defaults), defaults.get(leaf)


@functools.lru_cache(maxsize=64)
def _group_file(group: str, name: str) -> dict[str, Any]:
    """conf/<group>/<name>.yaml flattened; {} when the package has no such file."""
    from importlib.resources import files

    try:
        defaults = yaml.safe_load((files("slm_cli.conf") / group / f"{name}.yaml").read_text()) or {}
    except (OSError, ModuleNotFoundError, yaml.YAMLError):
        return {}
    return flatten(defaults) if isinstance(defaults, dict) else {}


def config_columns(runs: Sequence[Run]) -> tuple[list[str], dict[str, Any]]:
    """The config keys whose values differ between runs, and the values of the others.

    Bookkeeping keys (IGNORED_KEYS, IGNORED_PREFIXES) never count. A key absent from some runs
    counts as differing when the others set it (its value there is None, shown as "—"). A key of
    a group (``selection.score``, ``model.n_layer``) whose value follows from the group's ``name``,
    where that name differs, is left out when every run has its name's default (from the
    package's conf/<group>/<name>.yaml): the name says it. A budget (ratio/alpha) stays, and so
    does a non-default value (ESLM ranked by entropy beside CLM).
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
        for name, value in seen.items():
            found, default = _group_default(group, name, leaf)
            if found and _comparable(default) != value:
                return False  # a setting the name alone does not say
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
    """report.csv: config columns, n, method (the row's name for a reader), unfinished, seeds,
    <metric>_mean / <metric>_std (and _n for a downstream task, evaluated on some runs only), runs."""
    header = [*table.columns, "n", "method", "unfinished", "seeds"]
    shown = metrics(table)
    for figure, name, _ in shown:
        header += [f"{name}_mean", f"{name}_std"] + ([f"{name}_n"] if figure.startswith(ACCURACY) else [])
    header.append("runs")
    out = io.StringIO(newline="")
    writer = csv.writer(out)
    writer.writerow(header)
    for row in table.rows:
        line: list[Any] = ["" if v is None else v for v in row.key]
        line += [len(row.finished), table.label(row), len(row.runs) - len(row.finished),
                 " ".join(str(r.seed) for r in row.finished)]
        for figure, _, _ in shown:
            mean, std, n = row.stats(figure)
            line += ["" if mean is None else repr(mean), "" if std is None else repr(std)]
            line += [n] if figure.startswith(ACCURACY) else []
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
    if figure in ("selected_frac", "forward_frac", "flops_saved_frac_nominal", "flops_saved_frac_realized"):
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


def shown(table: Table) -> list[tuple[str, str]]:
    """(figure, heading) of the compact results table (md/html); report.csv has every figure. The
    share run forward only where some configuration runs fewer than all tokens forward
    (Hierarchical ESLM); the downstream accuracy has its own table (:func:`downstream_rows`)."""
    some_forward = any((row.stats("forward_frac")[0] or 1.0) < 1.0 for row in table.rows)
    return [(figure, heading) for figure, _, heading in metrics(table)
            if figure != "flops_clm" and not figure.startswith(ACCURACY)
            and (figure != "forward_frac" or some_forward)]


def config_cell(value: Any) -> str:
    """A config value in the md/html tables; "—" where a run does not have the key."""
    return "—" if value is None else format_value(value)


def results_rows(table: Table, run_name: Any) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the results table as text: the method, the config columns, n, the
    figures and the runs; ``run_name(run)`` names a run dir briefly."""
    figures = shown(table)
    header = ["method", *table.columns, "n", *(heading for _, heading in figures), "runs"]
    rows = []
    for row in table.rows:
        unfinished = len(row.runs) - len(row.finished)
        n = f"{len(row.finished)}" + (f" (+{unfinished} unfinished)" if unfinished else "")
        rows.append([table.label(row), *(config_cell(v) for v in row.key), n, *(cell(row, f) for f, _ in figures),
                     " ".join(run_name(r) for r in row.runs)])
    return header, rows


def accuracy_cell(row: Row, figure: str) -> str:
    """A downstream accuracy as "mean ± std (n=…)" over the row's evaluated runs."""
    mean, std, n = row.stats(figure)
    if mean is None:
        return "–"
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "") + f" (n={n})"


def downstream_rows(table: Table) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the downstream table: each configuration's accuracy per task (empty
    when no run has results)."""
    tasks = figures_named(table.rows, ACCURACY)
    if not tasks:
        return [], []
    header = ["configuration", *(f"acc {t[len(ACCURACY):]}" for t in tasks)]
    return header, [[table.label(row), *(accuracy_cell(row, t) for t in tasks)] for row in table.rows
                    if any(row.stats(t)[2] for t in tasks)]


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
