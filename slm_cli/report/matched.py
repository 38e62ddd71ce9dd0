"""The "against CLM" comparison of `slm report`: each configuration's final validation loss beside
CLM's at the same steps, at the same realised FLOPs (what the code executed) and at the same
nominal FLOPs (the papers' accounting).

A selection strategy saves FLOPs, so the fair question is not only "is it better after as many
steps?" but "is it better than CLM given the same compute?". CLM runs of several lengths (the same
config apart from ``trainer.max_steps``) trace CLM's loss against compute, each run with its own
full learning-rate schedule. A strategy's FLOPs are then located on that curve: CLM's loss there is
interpolated linearly in log FLOPs between the two CLM lengths around it (never extrapolated), and
its spread likewise. Each difference Δ = strategy − CLM comes with its standard error
sqrt(s₁²/n₁ + s₂²/n₂), and it counts as a difference only beyond twice that.

It also reads how fast a configuration gets there: the first step at which its mean validation
curve reaches CLM's final loss at the same steps (linear between validation points), the measure
the n-gram targets paper uses ("steps to reach CLM's loss"), and the same in seconds of training
(Lightning's ``train/time``: what the user pays). With downstream results (``slm eval tasks=``)
each task's accuracy is compared with CLM's at the same steps, and with runs of several lengths
the difference at the same steps is traced against the training length.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

from slm_cli.report.curves import row_curve
from slm_cli.report.runs import ACCURACY, ACCURACY_SE, SECONDS, Run, flatten
from slm_cli.report.table import IGNORED_KEYS, IGNORED_PREFIXES, Row, Table, figures_named

# Keys that may differ between a strategy and the CLM runs it is compared with: what is compared
# (selection, target, a warm start) and the budget; bookkeeping never counts (table.IGNORED_KEYS).
COMPARED_PREFIXES = ("selection.", "target.")
COMPARED_KEYS = {"trainer.selection_start_step"}
BUDGET_KEYS = {"trainer.max_steps", "trainer.max_tokens"}
SIGNIFICANCE = 2.0  # a difference counts beyond this many standard errors


@dataclass
class Point:
    """Mean and sample std of a figure over n runs (std 0 for one run)."""

    mean: float
    std: float
    n: int

    def minus(self, other: Point) -> tuple[float, float]:
        """(difference, its standard error)."""
        return self.mean - other.mean, math.sqrt(self.std ** 2 / self.n + other.std ** 2 / other.n)


@dataclass
class ClmLength:
    """CLM at one length: its steps, FLOPs (nominal equals realised for CLM) and final loss."""

    steps: float
    flops: float
    loss: Point
    row: Row


@dataclass
class Comparison:
    row: Row
    loss: Point
    same_steps: Point | None
    same_realized: Point | None
    same_nominal: Point | None
    steps: float
    steps_to_clm: float | None   # first step whose mean val loss reaches CLM's final loss at `steps`
    seconds_to_clm: float | None = None  # the same in seconds of training (train/time)
    clm_seconds: float | None = None     # CLM's own seconds to its final loss (its last validation)
    clm_row: Row | None = None           # CLM at the same steps: the downstream comparison's

    def accuracy(self, task: str) -> tuple[Point, Point] | None:
        """(this configuration's, CLM's at the same steps) accuracy on a downstream task (its
        figure ``acc:<task>``), when both have results. Each Point's spread carries the task's
        sampling error too: every seed answers the same examples, so averaging seeds does not
        shrink it, and the standard error of a mean accuracy is sqrt(std²/n + se²), with se the
        seeds' mean acc_stderr (the Point's std is set so that std/sqrt(n) is that)."""
        if self.clm_row is None:
            return None
        mine, clm = accuracy_point(self.row, task), accuracy_point(self.clm_row, task)
        return None if mine is None or clm is None else (mine, clm)


def accuracy_point(row: Row, task: str) -> Point | None:
    p = point(row, task)
    if p is None:
        return None
    se = row.stats(ACCURACY_SE + task[len(ACCURACY):])[0] or 0.0
    return Point(p.mean, math.sqrt(p.std**2 + p.n * se**2), p.n)


def is_clm(run: Run) -> bool:
    flat = flatten(run.config)
    return flat.get("selection.name") == "clm" and flat.get("target.name") in ("onehot", None)


def context(run: Run) -> tuple[tuple[str, str], ...]:
    """What must be equal for two runs to be compared: the config without what is compared, the
    budget, the seed and the keys that never tell runs apart."""
    flat = flatten(run.config)
    keep = {k: repr(v) for k, v in flat.items()
            if k not in IGNORED_KEYS and k not in BUDGET_KEYS and k not in COMPARED_KEYS
            and not k.startswith(IGNORED_PREFIXES) and not k.startswith(COMPARED_PREFIXES)}
    return tuple(sorted(keep.items()))


def point(row: Row, figure: str) -> Point | None:
    """A row's figure as a Point: Row.stats's mean, sample std (0 for one run) and count."""
    mean, std, n = row.stats(figure)
    return None if mean is None else Point(mean, std or 0.0, n)


def clm_lengths(rows: Sequence[Row]) -> list[ClmLength]:
    """CLM rows of one context, one per length, by increasing FLOPs."""
    out = []
    for row in rows:
        loss, steps, flops = point(row, "val_loss"), point(row, "steps"), point(row, "flops_realized")
        if loss and steps and flops:
            out.append(ClmLength(steps.mean, flops.mean, loss, row))
    return sorted(out, key=lambda b: b.flops)


def at_flops(lengths: Sequence[ClmLength], flops: float, tolerance: float = 0.005) -> Point | None:
    """CLM's final loss at ``flops``: a budget within ``tolerance`` (relative) of it, or linear in
    log FLOPs between the two lengths around it; None outside the lengths' range."""
    for b in lengths:
        if abs(b.flops - flops) <= tolerance * b.flops:
            return b.loss
    for lo, hi in zip(lengths, lengths[1:], strict=False):
        if lo.flops < flops < hi.flops:
            w = (math.log(flops) - math.log(lo.flops)) / (math.log(hi.flops) - math.log(lo.flops))
            return Point((1 - w) * lo.loss.mean + w * hi.loss.mean, (1 - w) * lo.loss.std + w * hi.loss.std,
                         min(lo.loss.n, hi.loss.n))
    return None


def steps_to_reach(runs: Sequence[Run], target: float, x: str = "step") -> float | None:
    """The first step (1-based, fractional) at which the mean validation curve of ``runs`` is at or
    below ``target``, linear between validation points; None if it never gets there (nothing is
    extrapolated beyond the last validation). ``x="train/time"``: the same in seconds of training."""
    curve = row_curve(runs, "val/loss", x)
    if curve is None:
        return None
    xs, ys, _ = curve
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if y <= target:
            if i == 0:
                return float(x)
            x0, y0 = xs[i - 1], ys[i - 1]
            return float(x0 + (x - x0) * (y0 - target) / (y0 - y))
    return None


def compare(table: Table) -> list[Comparison]:
    """Every configuration that has CLM runs in its context, against them (CLM rows are the
    reference, not compared)."""
    groups: dict[tuple, list[Row]] = {}
    for row in table.rows:
        if row.finished:
            groups.setdefault(context(row.finished[0]), []).append(row)
    out = []
    for rows in groups.values():
        lengths = clm_lengths([r for r in rows if all(is_clm(run) for run in r.finished)])
        if not lengths:
            continue
        out += [c for row in rows if not all(is_clm(run) for run in row.finished)
                if (c := against(row, lengths)) is not None]
    return out


def against(row: Row, lengths: Sequence[ClmLength]) -> Comparison | None:
    """One configuration against the CLM lengths of its context (None without a final loss)."""
    loss, steps = point(row, "val_loss"), point(row, "steps")
    nominal, realized = point(row, "flops_nominal"), point(row, "flops_realized")
    if loss is None or steps is None:
        return None
    same = next((b for b in lengths if b.steps == steps.mean), None)
    comparison = Comparison(
        row=row, loss=loss, steps=steps.mean, same_steps=same.loss if same else None,
        same_realized=at_flops(lengths, realized.mean) if realized else None,
        same_nominal=at_flops(lengths, nominal.mean) if nominal else None,
        steps_to_clm=steps_to_reach(row.finished, same.loss.mean) if same else None)
    if same is not None:
        clm_curve = row_curve(same.row.finished, "val/loss", SECONDS)
        comparison.clm_row = same.row
        comparison.seconds_to_clm = steps_to_reach(row.finished, same.loss.mean, SECONDS)
        comparison.clm_seconds = float(clm_curve[0][-1]) if clm_curve is not None else None
    return comparison


def verdict(diff: float, se: float, higher_is_better: bool = False, spread_known: bool = False) -> str:
    """"better", "worse" or "no difference" of a difference (this − CLM) with its standard error:
    a difference counts only beyond SIGNIFICANCE standard errors. A loss is better lower (the
    default), an accuracy higher. A zero standard error is no spread to judge by with one run on
    a side; with several runs on each (``spread_known``) the runs agree, and any difference counts."""
    if diff == 0:
        return "no difference"
    if se == 0 and not spread_known:
        return "one run each: no spread to judge by"
    if abs(diff) <= SIGNIFICANCE * se:
        return "no difference"
    return "better" if (diff > 0) == higher_is_better else "worse"


def delta(c: Point, clm: Point | None, higher_is_better: bool = False) -> str:
    """"−0.0123 ± 0.0040 (better)" — Δ against CLM with its standard error and verdict."""
    if clm is None:
        return "–"
    diff, se = c.minus(clm)
    return f"{diff:+.4f} ± {se:.4f} ({verdict(diff, se, higher_is_better, spread_known=min(c.n, clm.n) > 1)})"


# The comparisons in the order the tables show them: the realised FLOPs lead, nominal beside them.
SAME = ("same_steps", "same_realized", "same_nominal")
HEADER = ["configuration", "n", "val loss", "CLM, same steps", "Δ same steps", "CLM, same realised FLOPs",
          "Δ same realised FLOPs", "CLM, same nominal FLOPs (papers' accounting)",
          "Δ same nominal FLOPs (papers' accounting)", "steps to CLM's loss", "seconds to CLM's loss"]


def _loss(p: Point | None) -> str:
    if p is None:
        return "–"
    return f"{p.mean:.4f}" + (f" ± {p.std:.4f}" if p.n > 1 else "")


def reach_text(c: Comparison) -> tuple[str, str]:
    """The steps and the seconds to CLM's loss as the tables write them: "120 of 200", "never",
    "–" (no CLM at the same steps, or no train/time logged); the seconds beside CLM's own."""
    if c.same_steps is None:
        return "–", "–"
    steps = "never" if c.steps_to_clm is None else f"{c.steps_to_clm:.0f} of {c.steps:.0f}"
    if c.clm_seconds is None:
        return steps, "–"
    seconds = "never" if c.seconds_to_clm is None else f"{c.seconds_to_clm:.1f} s"
    return steps, f"{seconds} (CLM {c.clm_seconds:.1f} s)"


def rows_text(table: Table, comparisons: Sequence[Comparison]) -> list[list[str]]:
    out = []
    for c in comparisons:
        cells = [cell for name in SAME for cell in (_loss(getattr(c, name)), delta(c.loss, getattr(c, name)))]
        out.append([table.label(c.row), str(c.loss.n), _loss(c.loss), *cells, *reach_text(c)])
    return out


def downstream_text(table: Table, comparisons: Sequence[Comparison]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of Δ accuracy against CLM at the same steps, per downstream task (higher
    is better): "+0.0120 ± 0.0050 (better)"; empty without downstream results on both sides."""
    tasks = figures_named(table.rows, ACCURACY)
    rows = []
    for c in comparisons:
        pairs = [c.accuracy(t) for t in tasks]
        if any(pairs):
            rows.append([table.label(c.row), *("–" if p is None else delta(p[0], p[1], higher_is_better=True)
                                               for p in pairs)])
    header = ["configuration", *(f"Δ acc {t[len(ACCURACY):]}" for t in tasks)]
    return (header, rows) if rows else ([], [])


# What makes a configuration longer or shorter, not another configuration.
LENGTH_KEYS = ("trainer.max_steps", "trainer.max_tokens")


@dataclass
class Trend:
    """One configuration trained for several lengths: its Δ loss against CLM after the same steps
    at each length (CLM run for as many steps, with its own full schedule)."""

    label: str
    comparisons: list[Comparison]   # by increasing steps

    @property
    def steps(self) -> list[float]:
        return [c.steps for c in self.comparisons]

    def deltas(self) -> list[tuple[float, float]]:
        """(Δ = configuration − CLM, its standard error) at each length."""
        return [c.loss.minus(c.same_steps) for c in self.comparisons if c.same_steps is not None]


def by_length(table: Table, comparisons: Sequence[Comparison]) -> list[Trend]:
    """The configurations compared with CLM after the same steps at two lengths or more, each as
    one Trend (named without its length; a warm start by its share of the steps)."""
    groups: dict[str, list[Comparison]] = {}
    for c in comparisons:
        if c.same_steps is not None:
            groups.setdefault(table.label(c.row, skip=LENGTH_KEYS, warm_share=True), []).append(c)
    return [Trend(label, sorted(cs, key=lambda c: c.steps)) for label, cs in groups.items()
            if len({c.steps for c in cs}) > 1]


def length_text(trends: Sequence[Trend]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of Δ against CLM by training length: one row per configuration, one column
    per length ("–" where it was not run at that length)."""
    lengths = sorted({s for t in trends for s in t.steps})
    rows = []
    for t in trends:
        at = {c.steps: delta(c.loss, c.same_steps) for c in t.comparisons}
        rows.append([t.label, *(at.get(s, "–") for s in lengths)])
    return ["configuration", *(f"Δ after {s:.0f} steps" for s in lengths)], rows


def csv_text(table: Table, comparisons: Sequence[Comparison]) -> str:
    """against_clm.csv: the same comparison at full precision, one row per configuration."""
    header = [*table.columns, "n", "val_loss_mean", "val_loss_std", "steps"]
    for name in SAME:
        header += [f"clm_{name}_mean", f"clm_{name}_std", f"clm_{name}_n", f"delta_{name}", f"delta_{name}_se"]
    tasks = figures_named(table.rows, ACCURACY)
    header += ["steps_to_clm_loss", "seconds_to_clm_loss", "clm_seconds"]
    for task in tasks:
        name = f"acc_{task[len(ACCURACY):]}"
        header += [f"{name}_mean", f"{name}_n", f"clm_{name}_mean", f"clm_{name}_n", f"delta_{name}", f"delta_{name}_se"]
    out = io.StringIO(newline="")
    writer = csv.writer(out)
    writer.writerow(header)
    for c in comparisons:
        # config values written as report.csv writes them, so that the two files join on them
        line = ["" if v is None else v for v in c.row.key] + [c.loss.n, repr(c.loss.mean), repr(c.loss.std),
                                                                repr(c.steps)]
        for clm in (getattr(c, name) for name in SAME):
            if clm is None:
                line += ["", "", "", "", ""]
            else:
                diff, se = c.loss.minus(clm)
                line += [repr(clm.mean), repr(clm.std), clm.n, repr(diff), repr(se)]
        line += ["" if v is None else repr(v) for v in (c.steps_to_clm, c.seconds_to_clm, c.clm_seconds)]
        for task in tasks:
            pair = c.accuracy(task)
            line += ["", "", "", "", "", ""] if pair is None else [
                repr(pair[0].mean), pair[0].n, repr(pair[1].mean), pair[1].n, *map(repr, pair[0].minus(pair[1]))]
        writer.writerow(line)
    return out.getvalue()


NOTE = ("CLM's loss at a strategy's FLOPs comes from CLM runs of several lengths, each with its full "
        "learning-rate schedule, interpolated linearly in log FLOPs between the two around it (– outside "
        "their range). Δ = strategy − CLM ± its standard error; \"better\"/\"worse\" only beyond twice "
        "that (with one run on each side there is no spread to judge by). Steps to CLM's loss: the first step "
        "at which the strategy's mean validation loss reaches CLM's final loss at the same steps, linear between "
        "validations, never extrapolated; seconds to CLM's loss: the same in seconds of training (train/time: "
        "time inside training steps, validation excluded, on whatever else the machine ran), beside CLM's own "
        "seconds to its final loss.")
LENGTH_NOTE = ("Δ validation loss against CLM after the same steps (CLM trained for as many steps, with its own "
               "learning-rate schedule), at each training length; ± its standard error, \"better\"/\"worse\" only "
               "beyond twice that.")
