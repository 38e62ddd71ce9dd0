"""The figures of `slm report`, drawn with matplotlib's Agg backend into PNG files.

- val_loss_vs_flops.png: final validation loss against realised and nominal FLOPs, one series per
  strategy, seed spread as error bars, the Pareto front of all configurations dashed;
- loss_vs_tokens.png, loss_vs_flops.png: training and validation loss curves (mean over seeds,
  ±1 std shaded);
- val_loss_by_source.png: a mixture's validation loss on each source (data=mix);
- selection.png: the selected fraction of each step and, where logged, ESLM's alpha.

The style every figure shares is slm_cli/report/plot_style.py's; the curves are
slm_cli/report/curves.py's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from slm_cli.report.curves import loss_curves, selection_curves, source_curves
from slm_cli.report.plot_style import ALONG_SERIES, LOSS, eng, legend, pyplot, save, styles
from slm_cli.report.table import Table, format_value


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


def val_loss_vs_flops(table: Table, path: Path) -> Path | None:
    plt = pyplot()
    style, series = styles(table)
    along = [c for c in table.columns if c in ALONG_SERIES]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    drawn = False
    for ax, (figure, name, xlabel) in zip(axes, PANELS, strict=True):
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
            # name each point of a series by the budget / length keys that vary along it
            varying = [i for i, c in enumerate(table.columns)
                       if c in along and len({repr(p[4].key[i]) for p in pts}) > 1]
            if varying and len(pts) > 1:
                for x, y, _, _, row in pts:
                    text = ", ".join(f"{table.columns[i].rsplit('.', 1)[-1]}={format_value(row.key[i])}"
                                     for i in varying if row.key[i] is not None)
                    ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8,
                                color=color)
            everything += [(p[0], p[1]) for p in pts]
            drawn = True
        front = pareto_front(everything)
        if len(front) > 1:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="0.6",
                    linestyle="--", linewidth=1, zorder=0, label="Pareto front")
        _log_if_wide(ax, [p[0] for p in everything], ratio=10.0)
        eng(ax)
        ax.set_xlabel(xlabel)
        ax.set_title(f"final validation loss vs {name} FLOPs")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(f"validation {LOSS}")
    if not drawn:
        plt.close(fig)
        return None
    legend(fig, axes)
    return save(fig, path)


# (file name, caption, drawing function)
FIGURES: list[tuple[str, str, Callable[[Table, Path], Path | None]]] = [
    ("val_loss_vs_flops.png", "Final validation loss against the training FLOPs, realised (what the code "
     "executed) and nominal (the papers' accounting); mean over seeds, error bars ±1 std; dashed: "
     "the Pareto front.", val_loss_vs_flops),
    ("loss_vs_tokens.png", "Training and validation loss against training tokens seen; mean over seeds, "
     "±1 std shaded.", lambda t, p: loss_curves(t, p, ["tokens"])),
    ("loss_vs_flops.png", "Training and validation loss against cumulative training FLOPs, realised (left) "
     "and nominal, the papers' accounting (right).",
     lambda t, p: loss_curves(t, p, ["flops/realized", "flops/nominal"])),
    ("val_loss_by_source.png", "A mixture's validation loss on each of its sources against training tokens; "
     "mean over seeds, ±1 std shaded.", source_curves),
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
