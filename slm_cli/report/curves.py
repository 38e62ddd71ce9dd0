"""The curve figures of `slm report`: training and validation loss against steps, tokens, FLOPs or
seconds of training (mean over seeds, ±1 std shaded), and how much each configuration selects
(the share of tokens trained on, and where it moves during a run, its course with ESLM's alpha)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slm_cli.report.plot_style import LOSS, MANY, Style, eng, legend, pyplot, save, styles
from slm_cli.report.runs import SECONDS, Run
from slm_cli.report.table import Table


def _interp_from_origin(steps: Sequence[int], values: Sequence[float], at: np.ndarray) -> np.ndarray:
    """A cumulative counter (FLOPs) at other steps: linear between logged steps, from zero before
    the first step (metrics.csv's step s holds the count after s + 1 steps) and at the last rate
    after the last logged step."""
    xs = np.concatenate([[-1.0], np.asarray(steps, dtype=float)])
    ys = np.concatenate([[0.0], np.asarray(values, dtype=float)])
    out = np.interp(at, xs, ys)
    beyond = at > xs[-1]
    if beyond.any():
        rate = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        out[beyond] = ys[-1] + rate * (at[beyond] - xs[-1])
    return out


def resumed_time(values: Sequence[float]) -> np.ndarray:
    """train/time as one count over a resumed run: each process's ThroughputMonitor starts again
    from zero, so where the time falls, the time before the fall carries on under the new values."""
    out = np.asarray(values, dtype=float).copy()
    offset = 0.0
    for i in range(1, len(out)):
        if values[i] < values[i - 1]:
            offset = out[i - 1]
        out[i] = values[i] + offset
    return out


def _run_curve(run: Run, column: str, x: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(steps, x values, y values) of one metrics column; x: "step", "tokens", a FLOPs column or
    train/time (seconds of training)."""
    if column not in run.metrics:
        return None
    steps = np.asarray(run.metrics[column][0], dtype=float)
    ys = np.asarray(run.metrics[column][1], dtype=float)
    if x == "step":
        xs = steps + 1
    elif x == "tokens":
        per_step = run.tokens_per_step
        if per_step is None:
            return None
        xs = (steps + 1) * per_step
    else:
        if x not in run.metrics or not run.metrics[x][0]:
            return None
        counter_steps, counts = run.metrics[x]
        xs = _interp_from_origin(counter_steps, resumed_time(counts) if x == SECONDS else counts, at=steps)
    return steps, xs, ys


def row_curve(runs: Sequence[Run], column: str, x: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Mean x, mean y and std of y over ``runs`` at the steps all of them logged."""
    curves = [c for c in (_run_curve(r, column, x) for r in runs) if c is not None]
    if not curves:
        return None
    common = set(curves[0][0].tolist())
    for steps, _, _ in curves[1:]:
        common &= set(steps.tolist())
    at = np.array(sorted(common))
    if not len(at):
        return None
    xs, ys = [], []
    for steps, cx, cy in curves:
        index = {s: i for i, s in enumerate(steps.tolist())}
        take = [index[s] for s in at.tolist()]
        xs.append(cx[take])
        ys.append(cy[take])
    y = np.mean(ys, axis=0)
    std = np.std(ys, axis=0, ddof=1) if len(ys) > 1 else np.zeros_like(y)
    return np.mean(xs, axis=0), y, std


def _draw_curves(ax: Any, table: Table, style: dict[int, Style], column: str, x: str,
                 markers: bool = False, rows: Sequence[int] | None = None, coincide: bool = False) -> list[np.ndarray]:
    """Each configuration's mean curve over its finished runs (±1 std shaded), and its unfinished
    runs as thin lines, series by series; ``rows``: only these row indices. Returns the y values
    drawn (for the axis limits). Where many curves share a panel they are thinner and a little
    transparent; ``coincide``: curves that may lie on each other (a selected share, the same for
    100 and 200 steps) are drawn each thinner than the one before, so that all stay visible."""
    drawn = []
    chosen = sorted(range(len(table.rows)) if rows is None else rows, key=lambda i: style[i].order)
    many = len(chosen) >= MANY
    for k, i in enumerate(chosen):
        row, st = table.rows[i], style[i]
        curve = row_curve(row.finished, column, x)
        if curve is not None:
            cx, cy, std = curve
            # each curve a little thinner than the one before: where two coincide, both show
            width = st.width(len(chosen)) * (1 + 0.9 * (len(chosen) - 1 - k) / max(len(chosen) - 1, 1))
            ax.plot(cx, cy, color=st.color, linestyle=st.linestyle, linewidth=width if coincide else st.width(len(chosen)),
                    label=st.label, marker=st.marker if markers else None, markersize=4, alpha=0.85 if many else 1.0)
            if std.any():
                ax.fill_between(cx, cy - std, cy + std, color=st.color, alpha=0.08 if many else 0.15, linewidth=0)
            drawn.append(cy)
        for run in row.runs:
            if run.finished:
                continue
            part = _run_curve(run, column, x)
            if part is not None:
                ax.plot(part[1], part[2], color=st.color, linestyle=st.linestyle, linewidth=0.8, alpha=0.7,
                        label=f"{st.label} (unfinished)")
                drawn.append(part[2])
    return drawn


def _focus(ax: Any, drawn: list[np.ndarray]) -> None:
    """Loss falls steeply at first: keep the first fifth of each densely logged curve from setting
    the y range when it would squash the rest (the curves leave the plot at the top). Sparse
    curves (a few validation points) are shown whole."""
    if not any(len(d) >= 50 for d in drawn):
        return
    low = min(float(np.min(d)) for d in drawn)
    high_all = max(float(np.max(d)) for d in drawn)
    high = max(float(np.max(d[len(d) // 5:] if len(d) >= 50 else d)) for d in drawn)
    if high_all - low > 2.5 * (high - low) and high > low:
        pad = 0.08 * (high - low)
        ax.set_ylim(low - pad, high + 4 * pad)


_SHORT = {"step": "step", "tokens": "tokens", "flops/nominal": "nominal FLOPs", "flops/realized": "realised FLOPs",
          SECONDS: "seconds of training"}


def _axis_label(x: str) -> str:
    return {"step": "optimizer step", "tokens": "training tokens seen",
            "flops/nominal": "training FLOPs, nominal, the papers' accounting (cumulative)",
            "flops/realized": "training FLOPs, realised (cumulative)",
            SECONDS: "seconds of training (train/time: inside training steps, validation excluded)"}[x]


def _train_column(table: Table) -> tuple[str, str]:
    """train/loss_all (every token of the step, comparable across strategies) where logged; else
    train/loss (the selected tokens only)."""
    for row in table.rows:
        for run in row.runs:
            if "train/loss_all" in run.metrics:
                return "train/loss_all", "training loss (all tokens)"
    return "train/loss", "training loss (selected tokens)"


def loss_curves(table: Table, path: Path, xs: Sequence[str], train: bool = True) -> Path | None:
    """Loss against each x of ``xs``, one panel per (loss, x) side by side: the training loss
    (``train``, where logged) and the validation loss; without the training loss the panels
    share their y axis, so that one curve reads the same in each."""
    plt = pyplot()
    style, _ = styles(table)
    train_col, train_title = _train_column(table)
    kinds = [("val/loss", "validation loss", True)]
    if train and any(train_col in run.metrics for row in table.rows for run in row.runs):
        kinds.insert(0, (train_col, train_title, False))
    panels = [(kind, x) for kind in kinds for x in xs]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.7 * len(panels) + 0.4, 4.6), squeeze=False,
                             sharey=len(kinds) == 1)
    anything = False
    for ax, ((column, title, markers), x) in zip(axes[0], panels, strict=True):
        drawn = _draw_curves(ax, table, style, column, x, markers=markers)
        anything = anything or bool(drawn)
        _focus(ax, drawn)
        eng(ax)
        ax.set_title(f"{title} vs {_SHORT[x]}", fontsize=11)
        ax.set_ylabel(LOSS)
        ax.grid(True, alpha=0.3)
        ax.set_xlabel(_axis_label(x))
    if not anything:
        plt.close(fig)
        return None
    legend(fig, axes.ravel())
    return save(fig, path)


def source_curves(table: Table, path: Path) -> Path | None:
    """A mixture's validation loss on each source (val/<source>/loss) against tokens, one panel per
    source: what a strategy does to the target domain and to the rest, which the overall loss mixes."""
    plt = pyplot()
    style, _ = styles(table)
    sources = list(dict.fromkeys(
        key[len("val/"):-len("/loss")] for row in table.rows for run in row.runs for key in run.metrics
        if key.startswith("val/") and key.endswith("/loss") and key.count("/") == 2))
    if not sources:
        return None
    fig, axes = plt.subplots(1, len(sources), figsize=(4.4 * len(sources) + 0.4, 4.4), squeeze=False)
    for ax, source in zip(axes[0], sources, strict=True):
        _draw_curves(ax, table, style, f"val/{source}/loss", "tokens", markers=True)
        eng(ax)
        ax.set_title(f"validation loss on {source}", fontsize=11)
        ax.set_xlabel(_axis_label("tokens"))
        ax.set_ylabel(LOSS)
        ax.grid(True, alpha=0.3)
    legend(fig, axes.ravel())
    return save(fig, path)


def seconds_curves(table: Table, path: Path) -> Path | None:
    """Validation loss against seconds of training (train/time): what a configuration gives for
    the time the user pays, on this machine with whatever else it ran."""
    plt = pyplot()
    style, _ = styles(table)
    fig, ax = plt.subplots(figsize=(9.0, 4.8))
    drawn = _draw_curves(ax, table, style, "val/loss", SECONDS, markers=True)
    if not drawn:
        plt.close(fig)
        return None
    _focus(ax, drawn)
    eng(ax)
    ax.set_title("validation loss vs seconds of training", fontsize=11)
    ax.set_xlabel(_axis_label(SECONDS))
    ax.set_ylabel(LOSS)
    ax.grid(True, alpha=0.3)
    legend(fig, [ax])
    return save(fig, path)


# What a run logs of its selection, each drawn over the run where it moves: (column, panel title).
MOVING = (("train/selected_frac", "share trained on, where it moves"),
          ("selection/alpha", "ESLM's alpha, where it moves"),
          ("train/forward_frac", "share run forward, where it moves"))
MOVES = 0.02  # a quantity moves during a run when its mean curve spans more than this


def _shares(table: Table, style: dict[int, Style]) -> list[tuple[int, float, float, float, float | None]]:
    """Per configuration: (row index, mean, min and max over the run of the share of tokens
    trained on, and the share run forward when below 1). The mean is the summary's when the
    run finished, else the logged curve's."""
    out = []
    for i in sorted(range(len(table.rows)), key=lambda i: style[i].order):
        row = table.rows[i]
        curve = row_curve(row.finished or row.runs, "train/selected_frac", "step")
        mean = row.stats("selected_frac")[0]
        if curve is None and mean is None:
            continue
        low, high = (float(curve[1].min()), float(curve[1].max())) if curve is not None else (mean, mean)
        forward = row.stats("forward_frac")[0]
        out.append((i, float(mean if mean is not None else curve[1].mean()), low, high,
                    forward if forward is not None and forward < 1 else None))
    return out


def _share_panel(ax: Any, table: Table, style: dict[int, Style], shares: Sequence[tuple]) -> None:
    """One line per configuration: a dot at its mean share of tokens trained on, a bar over the
    range it moves in, an open marker at the share run forward (Hierarchical ESLM)."""
    for y, (i, mean, low, high, forward) in enumerate(shares):
        st = style[i]
        if high - low > MOVES:
            ax.plot([low, high], [y, y], color=st.color, linewidth=2.2, alpha=0.6, solid_capstyle="butt")
        ax.plot([mean], [y], marker=st.marker, color=st.color, markersize=7, linestyle="none")
        if forward is not None:
            ax.plot([forward], [y], marker=st.marker, markerfacecolor="white", color=st.color, markersize=7,
                    linestyle="none")
        ax.annotate(f"{mean:.2f}", (max(high, forward or 0.0), y), textcoords="offset points", xytext=(7, -3),
                    fontsize=8, color="0.25")
    ax.set_yticks(range(len(shares)), [style[i].label for i, *_ in shares], fontsize=9)
    ax.set_ylim(len(shares) - 0.5, -0.5)
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("share of the tokens drawn: mean (dot), range (bar),\nrun forward (open)")
    ax.set_title("tokens trained on", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)


def selection_curves(table: Table, path: Path) -> Path | None:
    """How much each configuration selects: its mean share of tokens trained on (every
    configuration, one line each), and beside it the course over the run of each logged quantity
    (MOVING) for the configurations where it moves (Ada-ESLM's alpha, a warm start's share); a
    share that stays put is the dot alone, not one more flat line over the others."""
    plt = pyplot()
    style, _ = styles(table)
    shares = _shares(table, style)
    if not shares:
        return None
    moving = []
    for column, title in MOVING:
        rows = [i for i, row in enumerate(table.rows)
                if (c := row_curve(row.finished or row.runs, column, "step")) is not None and np.ptp(c[1]) > MOVES]
        if rows:
            moving.append((column, title, rows))
    height = max(3.6, 0.3 * len(shares) + 1.4)
    fig, axes = plt.subplots(1, 1 + len(moving), figsize=(5.6 + 3.4 * len(moving), height), squeeze=False,
                             gridspec_kw={"width_ratios": [1.25] + [1.0] * len(moving)})
    _share_panel(axes[0][0], table, style, shares)
    for ax, (column, title, rows) in zip(axes[0][1:], moving, strict=True):
        _draw_curves(ax, table, style, column, "step", markers=False, rows=rows, coincide=True)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(_axis_label("step"))
        ax.set_ylim(0, 1.05)
        ax.grid(True, alpha=0.3)
        eng(ax)
    legend(fig, axes[0][1:])
    return save(fig, path)
