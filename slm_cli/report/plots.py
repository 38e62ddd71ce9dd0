"""The figures of `slm report`, drawn with matplotlib's Agg backend into PNG files.

- val_loss_vs_flops.png: final validation loss against realised and nominal FLOPs, one series per
  strategy, seed spread as error bars, the Pareto front of all configurations dashed;
- loss_vs_tokens.png: training and validation loss against tokens (mean over seeds, ±1 std
  shaded); loss_vs_flops.png: validation loss against realised and nominal FLOPs;
- val_loss_vs_seconds.png: validation loss against seconds of training (train/time);
- delta_vs_length.png: Δ validation loss against CLM after the same steps, by training length;
- val_loss_by_source.png: a mixture's validation loss on each source (data=mix);
- selection.png: the share of tokens each configuration trains on, and where it moves during a
  run (Ada-ESLM's alpha, a warm start), its course.

The style every figure shares is slm_cli/report/plot_style.py's; the curves are
slm_cli/report/curves.py's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from slm_cli.report import matched
from slm_cli.report.curves import loss_curves, seconds_curves, selection_curves, source_curves
from slm_cli.report.plot_style import ALONG_SERIES, LOSS, eng, label_points, legend, pyplot, save, styles
from slm_cli.report.table import Row, Table


def _log_if_wide(ax: Any, values: Sequence[float], axis: str = "x", ratio: float = 20.0) -> None:
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > ratio:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")


# ---- final validation loss against FLOPs (the Pareto view) --------------------------------------

def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both cost and loss, by increasing cost."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


# The realised FLOPs (what the code executed) on the left, the papers' nominal accounting beside them.
PANELS = (("flops_realized", "realised", "training FLOPs, realised (total per run)"),
          ("flops_nominal", "nominal", "training FLOPs, nominal, the papers' accounting (total per run)"))


def _point_name(table: Table, row: Row, varying: Sequence[str]) -> str:
    """What sets a point apart on its series' line: its budget ("keep 0.6") where the budget
    varies along the series, its length ("400 steps") where that does."""
    parts = []
    if any(c.startswith("selection.") for c in varying):
        parts += list(table.method(row).budget) or [f"{c.rsplit('.', 1)[-1]}={v}" for c, v in
                                                    zip(table.columns, row.key, strict=True) if c in varying
                                                    and c.startswith("selection.")]
    if "trainer.max_steps" in varying and (steps := row.key[table.columns.index("trainer.max_steps")]) is not None:
        parts.append(f"{steps} steps")
    return ", ".join(parts)


def _series_points(table: Table, members: Sequence[int], figure: str) -> list[tuple[float, float, float, float, Row]]:
    """(x, y, x std, y std, row) of a series' configurations with both figures, by increasing x."""
    pts = []
    for i in members:
        row = table.rows[i]
        x, xerr, _ = row.stats(figure)
        y, yerr, _ = row.stats("val_loss")
        if x is not None and y is not None:
            pts.append((x, y, xerr or 0.0, yerr or 0.0, row))
    return sorted(pts, key=lambda p: p[0])


def val_loss_vs_flops(table: Table, path: Path) -> Path | None:
    plt = pyplot()
    style, series = styles(table)
    along = [c for c in table.columns if c in ALONG_SERIES]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True)
    drawn, labels = False, []
    for ax, (figure, name, xlabel) in zip(axes, PANELS, strict=True):
        everything: list[tuple[float, float]] = []
        names, lines = [], []
        for label, members in series.items():
            pts = _series_points(table, members, figure)
            if not pts:
                continue
            st = style[members[0]]
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], xerr=[p[2] for p in pts], yerr=[p[3] for p in pts],
                        color=st.color, marker=st.marker, markersize=6, capsize=3,
                        linestyle=st.linestyle if len(pts) > 1 else "none", linewidth=1.2,
                        label=st.label if len(members) == 1 else label)
            # name each point of a series by the budget / length that vary along it
            varying = [c for c in along if len({repr(p[4].key[table.columns.index(c)]) for p in pts}) > 1]
            if len(pts) > 1:
                names += [(x, y, _point_name(table, row, varying), st.color) for x, y, _, _, row in pts]
                lines.append([(p[0], p[1]) for p in pts])
            everything += [(p[0], p[1]) for p in pts]
            drawn = True
        front = pareto_front(everything)
        if len(front) > 1:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="0.6",
                    linestyle="--", linewidth=1, zorder=0, label="Pareto front")
            lines.append([q for a, b in zip(front, front[1:], strict=False) for q in (a, (b[0], a[1]))] + [front[-1]])
        _log_if_wide(ax, [p[0] for p in everything], ratio=10.0)
        eng(ax)
        ax.set_xlabel(xlabel)
        ax.set_title(f"final validation loss vs {name} FLOPs", fontsize=11)
        ax.grid(True, alpha=0.3)
        labels.append((ax, [n for n in names if n[2]], lines))
    axes[0].set_ylabel(f"validation {LOSS}")
    if not drawn:
        plt.close(fig)
        return None
    legend(fig, axes)
    for ax, names, lines in labels:
        label_points(ax, names, lines)
    return save(fig, path)


def delta_vs_length(table: Table, path: Path) -> Path | None:
    """Δ validation loss against CLM after the same steps, against the training length, one line
    per configuration run at two lengths or more; error bars ±2 standard errors (the verdict's
    threshold: a bar that crosses zero is no difference)."""
    plt = pyplot()
    trends = matched.by_length(table, matched.compare(table))
    if not trends:
        return None
    style, _ = styles(table)
    index = {id(row): i for i, row in enumerate(table.rows)}
    fig, ax = plt.subplots(figsize=(9.0, 4.8))
    ax.axhline(0.0, color="0.2", linewidth=1, label="CLM (same steps)")
    for trend in trends:
        st = style[index[id(trend.comparisons[0].row)]]
        deltas = trend.deltas()
        ax.errorbar(trend.steps, [d for d, _ in deltas], yerr=[matched.SIGNIFICANCE * se for _, se in deltas],
                    color=st.color, marker=st.marker, linestyle=st.linestyle, linewidth=1.4, capsize=3,
                    label=trend.label)
    _log_if_wide(ax, [s for t in trends for s in t.steps], ratio=7.0)
    steps = sorted({s for t in trends for s in t.steps})
    ax.set_xticks(steps, [f"{s:.0f}" for s in steps])
    ax.minorticks_off()
    ax.set_xlabel("training length (optimizer steps; CLM trained as long)")
    ax.set_ylabel("Δ validation loss vs CLM (nats/token)")
    ax.set_title("Δ vs CLM after the same steps, by training length (bars ±2 SE)", fontsize=11)
    ax.grid(True, alpha=0.3)
    legend(fig, [ax])
    return save(fig, path)


# (file name, caption, drawing function)
FIGURES: list[tuple[str, str, Callable[[Table, Path], Path | None]]] = [
    ("val_loss_vs_flops.png", "Final validation loss against the training FLOPs, realised (what the code "
     "executed) and nominal (the papers' accounting); mean over seeds, error bars ±1 std; dashed: "
     "the Pareto front.", val_loss_vs_flops),
    ("loss_vs_tokens.png", "Training and validation loss against training tokens seen; mean over seeds, "
     "±1 std shaded.", lambda t, p: loss_curves(t, p, ["tokens"])),
    ("loss_vs_flops.png", "Validation loss against cumulative training FLOPs, realised (left) and nominal, "
     "the papers' accounting (right); mean over seeds, ±1 std shaded.",
     lambda t, p: loss_curves(t, p, ["flops/realized", "flops/nominal"], train=False)),
    ("val_loss_vs_seconds.png", "Validation loss against seconds of training (train/time: inside training "
     "steps, validation excluded; on this machine, with whatever else it ran); mean over seeds, ±1 std shaded.",
     seconds_curves),
    ("delta_vs_length.png", "Δ validation loss against CLM after the same steps (CLM trained as long, with its "
     "own schedule), by training length; bars ±2 standard errors: a bar across zero is no difference.",
     delta_vs_length),
    ("val_loss_by_source.png", "A mixture's validation loss on each of its sources against training tokens; "
     "mean over seeds, ±1 std shaded.", source_curves),
    ("selection.png", "The share of the tokens drawn that each configuration trains on (dot: mean over the "
     "run; bar: the range it moves in; open marker: the share run forward), and, where it moves during a run, "
     "its course by optimizer step with ESLM's alpha (Ada-ESLM adapts it).", selection_curves),
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
