"""The curve figures of `slm report`: training and validation loss against steps, tokens or FLOPs
(mean over seeds, ±1 std shaded), and the selected fraction of each step with ESLM's alpha."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slm_cli.report.plot_style import LOSS, STYLES, Style, eng, legend, pyplot, save, styles
from slm_cli.report.runs import Run
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


def _run_curve(run: Run, column: str, x: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(steps, x values, y values) of one metrics column; x: "step", "tokens" or a FLOPs column."""
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
        xs = _interp_from_origin(*run.metrics[x], at=steps)
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
                 markers: bool = False, overlaps: bool = False) -> list[np.ndarray]:
    """Each configuration's mean curve over its finished runs (±1 std shaded), and its unfinished
    runs as thin lines. Returns the y values drawn (for the axis limits).

    ``overlaps``: curves that may coincide (two strategies with the same budget select the same
    fraction) get their own dash pattern and a width that shrinks with each row, so that a
    later curve lies inside an earlier one and both stay visible."""
    drawn = []
    n = len(table.rows)
    for i, row in enumerate(table.rows):
        st = style[i]
        linestyle, width = st.linestyle, 1.6
        if overlaps:
            linestyle, width = STYLES[i % len(STYLES)], 1.4 + 2.6 * (n - 1 - i) / max(n - 1, 1)
        curve = row_curve(row.finished, column, x)
        if curve is not None:
            cx, cy, std = curve
            ax.plot(cx, cy, color=st.color, linestyle=linestyle, linewidth=width, label=st.label,
                    marker=st.marker if markers else None, markersize=4)
            if std.any():
                ax.fill_between(cx, cy - std, cy + std, color=st.color, alpha=0.15, linewidth=0)
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


_SHORT = {"step": "step", "tokens": "tokens", "flops/nominal": "nominal FLOPs", "flops/realized": "realised FLOPs"}


def _axis_label(x: str) -> str:
    return {"step": "optimizer step", "tokens": "training tokens seen",
            "flops/nominal": "training FLOPs, nominal, the papers' accounting (cumulative)",
            "flops/realized": "training FLOPs, realised (cumulative)"}[x]


def _train_column(table: Table) -> tuple[str, str]:
    """train/loss_all (every token of the step, comparable across strategies) where logged; else
    train/loss (the selected tokens only)."""
    for row in table.rows:
        for run in row.runs:
            if "train/loss_all" in run.metrics:
                return "train/loss_all", "training loss (all tokens)"
    return "train/loss", "training loss (selected tokens)"


def loss_curves(table: Table, path: Path, xs: Sequence[str]) -> Path | None:
    """Training and validation loss against each x of ``xs``: side by side for one x; for
    several, training on top and validation below, one column per x."""
    plt = pyplot()
    style, _ = styles(table)
    train_col, train_title = _train_column(table)
    kinds = ((train_col, train_title, False), ("val/loss", "validation loss", True))
    if len(xs) == 1:
        fig, axes = plt.subplots(1, 2, figsize=(11.4, 4.6), squeeze=False, sharex=True)
        panels = [(axes[0][i], kind, xs[0], True) for i, kind in enumerate(kinds)]
    else:
        fig, axes = plt.subplots(2, len(xs), figsize=(5.6 * len(xs) + 0.4, 8.2), squeeze=False, sharex="col")
        panels = [(axes[i][j], kind, x, i == 1) for j, x in enumerate(xs) for i, kind in enumerate(kinds)]
    anything = False
    for ax, (column, title, markers), x, bottom in panels:
        drawn = _draw_curves(ax, table, style, column, x, markers=markers)
        anything = anything or bool(drawn)
        _focus(ax, drawn)
        eng(ax)
        ax.set_title(f"{title} vs {_SHORT[x]}", fontsize=11)
        ax.set_ylabel(LOSS)
        ax.grid(True, alpha=0.3)
        if bottom:
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


def selection_curves(table: Table, path: Path) -> Path | None:
    """The selected fraction of each step, and ESLM's alpha where a run logged it."""
    plt = pyplot()
    style, _ = styles(table)
    has_alpha = any("selection/alpha" in r.metrics for row in table.rows for r in row.runs)
    panels = [("train/selected_frac", "selected fraction of each step's tokens", "selected fraction")]
    if has_alpha:
        panels.append(("selection/alpha", "ESLM confidence alpha (Ada-ESLM: adapted each step)", "alpha"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels) + 0.4, 4.4), squeeze=False)
    anything = False
    for ax, (column, title, ylabel) in zip(axes[0], panels, strict=True):
        drawn = _draw_curves(ax, table, style, column, "step", overlaps=True)
        anything = anything or bool(drawn)
        ax.set_title(title)
        ax.set_xlabel(_axis_label("step"))
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1.05)
        ax.grid(True, alpha=0.3)
    if not anything:
        plt.close(fig)
        return None
    legend(fig, axes.ravel())
    return save(fig, path)
