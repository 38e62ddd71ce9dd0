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
the n-gram targets paper uses ("steps to reach CLM's loss").
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

from slm_cli.report.curves import row_curve
from slm_cli.report.runs import Run, flatten
from slm_cli.report.table import IGNORED_KEYS, IGNORED_PREFIXES, Row, Table

# Keys that may differ between a strategy and the CLM runs it is compared with: what is compared
# (selection, target), the budget (steps and what follows from them) and the run's name.
COMPARED_PREFIXES = ("selection.", "target.")
BUDGET_KEYS = {"trainer.max_steps", "trainer.max_tokens", "trainer.val_check_interval",
               "trainer.checkpoint_every_n_steps", "task_name"}
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


def is_clm(run: Run) -> bool:
    flat = flatten(run.config)
    return flat.get("selection.name") == "clm" and flat.get("target.name") in ("onehot", None)


def context(run: Run) -> tuple[tuple[str, str], ...]:
    """What must be equal for two runs to be compared: the config without what is compared, the
    budget, the seed and the keys that never tell runs apart."""
    flat = flatten(run.config)
    keep = {k: repr(v) for k, v in flat.items()
            if k not in IGNORED_KEYS and k not in BUDGET_KEYS
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


def steps_to_reach(runs: Sequence[Run], target: float) -> float | None:
    """The first step (1-based, fractional) at which the mean validation curve of ``runs`` is at or
    below ``target``, linear between validation points; None if it never gets there."""
    curve = row_curve(runs, "val/loss", "step")
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
    """Every configuration that has CLM runs in its context, against them (CLM rows too: a CLM row
    shorter than the longest is compared at its own steps and FLOPs, trivially equal)."""
    groups: dict[tuple, list[Row]] = {}
    for row in table.rows:
        if row.finished:
            groups.setdefault(context(row.finished[0]), []).append(row)
    out = []
    for rows in groups.values():
        lengths = clm_lengths([r for r in rows if all(is_clm(run) for run in r.finished)])
        if not lengths:
            continue
        for row in rows:
            if all(is_clm(run) for run in row.finished):
                continue
            loss, steps = point(row, "val_loss"), point(row, "steps")
            nominal, realized = point(row, "flops_nominal"), point(row, "flops_realized")
            if loss is None or steps is None:
                continue
            same = next((b for b in lengths if b.steps == steps.mean), None)
            out.append(Comparison(
                row=row, loss=loss, steps=steps.mean,
                same_steps=same.loss if same else None,
                same_realized=at_flops(lengths, realized.mean) if realized else None,
                same_nominal=at_flops(lengths, nominal.mean) if nominal else None,
                steps_to_clm=steps_to_reach(row.finished, same.loss.mean) if same else None))
    return out


def verdict(diff: float, se: float) -> str:
    if se == 0:
        return "one run each: no spread to judge by"
    if abs(diff) <= SIGNIFICANCE * se:
        return "no difference"
    return "better" if diff < 0 else "worse"


def delta(c: Point, clm: Point | None) -> str:
    """"−0.0123 ± 0.0040 (better)" — Δ loss against CLM with its standard error and verdict."""
    if clm is None:
        return "–"
    diff, se = c.minus(clm)
    return f"{diff:+.4f} ± {se:.4f} ({verdict(diff, se)})"


# The comparisons in the order the tables show them: the realised FLOPs lead, nominal beside them.
SAME = ("same_steps", "same_realized", "same_nominal")
HEADER = ["configuration", "n", "val loss", "CLM, same steps", "Δ same steps", "CLM, same realised FLOPs",
          "Δ same realised FLOPs", "CLM, same nominal FLOPs (papers' accounting)",
          "Δ same nominal FLOPs (papers' accounting)", "steps to CLM's loss"]


def _loss(p: Point | None) -> str:
    if p is None:
        return "–"
    return f"{p.mean:.4f}" + (f" ± {p.std:.4f}" if p.n > 1 else "")


def rows_text(table: Table, comparisons: Sequence[Comparison]) -> list[list[str]]:
    out = []
    for c in comparisons:
        reach = "never" if c.steps_to_clm is None else f"{c.steps_to_clm:.0f}"
        if c.same_steps is None:
            reach = "–"
        cells = [cell for name in SAME for cell in (_loss(getattr(c, name)), delta(c.loss, getattr(c, name)))]
        out.append([table.label(c.row), str(c.loss.n), _loss(c.loss), *cells, f"{reach} of {c.steps:.0f}"])
    return out


def csv_text(table: Table, comparisons: Sequence[Comparison]) -> str:
    """against_clm.csv: the same comparison at full precision, one row per configuration."""
    header = [*table.columns, "n", "val_loss_mean", "val_loss_std", "steps"]
    for name in SAME:
        header += [f"clm_{name}_mean", f"clm_{name}_std", f"clm_{name}_n", f"delta_{name}", f"delta_{name}_se"]
    header.append("steps_to_clm_loss")
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
        line.append("" if c.steps_to_clm is None else repr(c.steps_to_clm))
        writer.writerow(line)
    return out.getvalue()


NOTE = ("CLM's loss at a strategy's FLOPs comes from CLM runs of several lengths, each with its full "
        "learning-rate schedule, interpolated linearly in log FLOPs between the two around it (– outside "
        "their range). Δ = strategy − CLM ± its standard error; \"better\"/\"worse\" only beyond twice "
        "that (with one run on each side there is no spread to judge by). Steps to CLM's loss: the first step at which the strategy's mean validation loss reaches "
        "CLM's final loss at the same steps.")
