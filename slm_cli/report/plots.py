"""The figures of `slm report`, drawn with matplotlib's Agg backend into PNG files.

- val_loss_vs_flops.png: final validation loss against nominal and realised FLOPs, one series per
  strategy, seed spread as error bars, the Pareto front of all configurations dashed;
- loss_vs_tokens.png, loss_vs_flops.png: training and validation loss curves (mean over seeds,
  ±1 std shaded);
- selection.png: the selected fraction of each step and, where logged, ESLM's alpha.

Colour names a series (the configuration without its budget and step count), line style or
marker the configuration within it; every figure uses the same mapping.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slm_cli.errors import SlmError
from slm_cli.report.runs import Run
from slm_cli.report.table import Table, format_value

# Config columns that move a configuration along its strategy's curve rather than starting a new
# series: the token budget and the training length.
ALONG_SERIES = ("selection.ratio", "selection.alpha", "trainer.max_steps")
STYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
LOSS = "loss (nats/token)"


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only: no display needed, none opened)."""
    try:
        import matplotlib
    except ImportError:
        raise SlmError("slm report draws its plots with matplotlib, which is not installed: "
                       "pip install 'slm[report]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


@dataclass
class Style:
    label: str
    color: Any
    linestyle: str
    marker: str


def styles(table: Table) -> tuple[dict[int, Style], dict[str, list[int]]]:
    """Row index -> its style, and series label -> its row indices."""
    plt = pyplot()
    skip = [c for c in table.columns if c in ALONG_SERIES]
    series: dict[str, list[int]] = {}
    for i, row in enumerate(table.rows):
        series.setdefault(table.label(row, skip=skip), []).append(i)
    cmap = plt.get_cmap("tab10" if len(series) <= 10 else "tab20")
    out = {}
    for s, members in enumerate(series.values()):
        for j, i in enumerate(members):
            out[i] = Style(table.label(table.rows[i]), cmap(s % cmap.N), STYLES[j % len(STYLES)],
                           MARKERS[j % len(MARKERS)])
    return out, series


def _save(fig: Any, path: Path) -> Path:
    """The figure as a 256-colour PNG: a plot has few colours, and a third of the size of a
    full-colour PNG keeps the HTML page (which embeds every plot) light."""
    import io

    from PIL import Image  # a dependency of matplotlib

    buffer = io.BytesIO()
    # No "Software" text chunk: the PNGs carry no URL and do not change with the matplotlib version.
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    pyplot().close(fig)
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
    return path


def _legend(fig: Any, axes: Sequence[Any]) -> None:
    """One legend for the figure, below the panels, with each label once (the PNG is cropped
    to include it: savefig's bbox_inches="tight")."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    fig.tight_layout()
    if "Pareto front" in seen:  # after the series it is drawn through
        seen["Pareto front"] = seen.pop("Pareto front")
    if seen:
        # as many columns as fit the figure's width (about 2.3 inches each): one row where possible
        ncol = min(len(seen), max(2, round(fig.get_figwidth() / 2.3)))
        fig.legend(list(seen.values()), list(seen), loc="upper center", ncol=ncol,
                   frameon=False, bbox_to_anchor=(0.5, 0.0))


def _log_if_wide(ax: Any, values: Sequence[float], axis: str = "x", ratio: float = 20.0) -> None:
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > ratio:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")


def _eng(ax: Any, axis: str = "x") -> None:
    """SI prefixes on a linear axis (1.5G rather than 1.5e9 in a corner), with few enough ticks
    that their labels do not run into each other."""
    from matplotlib.ticker import EngFormatter, MaxNLocator

    target = ax.xaxis if axis == "x" else ax.yaxis
    if target.get_scale() == "linear":
        target.set_major_formatter(EngFormatter(sep=""))
        target.set_major_locator(MaxNLocator(nbins=6))


# ---- final validation loss against FLOPs (the Pareto view) --------------------------------------

def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both cost and loss, by increasing cost."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def val_loss_vs_flops(table: Table, path: Path) -> Path | None:
    plt = pyplot()
    style, series = styles(table)
    along = [c for c in table.columns if c in ALONG_SERIES]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    drawn = False
    for ax, (figure, name) in zip(axes, (("flops_nominal", "nominal"), ("flops_realized", "realised")),
                                  strict=True):
        everything: list[tuple[float, float]] = []
        for label, members in series.items():
            pts = []
            for i in members:
                row = table.rows[i]
                x, xerr, _ = row.stats(figure)
                y, yerr, _ = row.stats("val_loss")
                if x is None or y is None:
                    continue
                pts.append((x, y, xerr or 0.0, yerr or 0.0, row))
            if not pts:
                continue
            pts.sort(key=lambda p: p[0])
            color = style[members[0]].color
            if len(members) == 1:  # a series of one configuration: name its budget too
                label = style[members[0]].label
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], xerr=[p[2] for p in pts],
                        yerr=[p[3] for p in pts], color=color, marker="o", markersize=6, capsize=4,
                        linestyle="-" if len(pts) > 1 else "none", linewidth=1, label=label)
            if along and len(pts) > 1:  # name the budget / length of each point of a series
                for x, y, _, _, row in pts:
                    text = ", ".join(f"{c.rsplit('.', 1)[-1]}={format_value(v)}"
                                     for c, v in zip(table.columns, row.key, strict=True)
                                     if c in along and v is not None)
                    ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8,
                                color=color)
            everything += [(p[0], p[1]) for p in pts]
            drawn = True
        front = pareto_front(everything)
        if len(front) > 1:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="0.6",
                    linestyle="--", linewidth=1, zorder=0, label="Pareto front")
        _log_if_wide(ax, [p[0] for p in everything], ratio=10.0)
        _eng(ax)
        ax.set_xlabel(f"training FLOPs, {name} (total per run)")
        ax.set_title(f"final validation loss vs {name} FLOPs")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(f"validation {LOSS}")
    if not drawn:
        plt.close(fig)
        return None
    _legend(fig, axes)
    return _save(fig, path)


# ---- curves ----------------------------------------------------------------------------------

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
            "flops/nominal": "training FLOPs, nominal (cumulative)",
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
        _eng(ax)
        ax.set_title(f"{title} vs {_SHORT[x]}", fontsize=11)
        ax.set_ylabel(LOSS)
        ax.grid(True, alpha=0.3)
        if bottom:
            ax.set_xlabel(_axis_label(x))
    if not anything:
        plt.close(fig)
        return None
    _legend(fig, axes.ravel())
    return _save(fig, path)


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
    _legend(fig, axes.ravel())
    return _save(fig, path)


# (file name, caption, drawing function)
FIGURES: list[tuple[str, str, Callable[[Table, Path], Path | None]]] = [
    ("val_loss_vs_flops.png", "Final validation loss against the training FLOPs, nominal (the papers' "
     "accounting) and realised (what the code executed); mean over seeds, error bars ±1 std; dashed: "
     "the Pareto front.", val_loss_vs_flops),
    ("loss_vs_tokens.png", "Training and validation loss against training tokens seen; mean over seeds, "
     "±1 std shaded.", lambda t, p: loss_curves(t, p, ["tokens"])),
    ("loss_vs_flops.png", "Training and validation loss against cumulative training FLOPs, nominal (left) "
     "and realised (right).", lambda t, p: loss_curves(t, p, ["flops/nominal", "flops/realized"])),
    ("selection.png", "Selected fraction of each step's tokens, and ESLM's alpha (adapted by Ada-ESLM), "
     "by optimizer step.", selection_curves),
]


def draw_all(table: Table, folder: Path) -> list[tuple[Path, str]]:
    """Every figure that has data, as (file, caption)."""
    pyplot()  # the missing-extra message before any work
    made = []
    for name, caption, draw in FIGURES:
        path = draw(table, folder / name)
        if path is not None:
            made.append((path, caption))
    return made
