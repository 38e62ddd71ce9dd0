"""What every figure of `slm report` shares: matplotlib on the Agg backend, one style per
configuration, the figure's legend, SI axis labels and the PNG it is saved as.

A configuration's look is the same in every figure: its method family (CLM, Random, ESLM, ...)
sets the line style and marker, its series (the method without its budget and length, e.g.
"ESLM (loss)") the hue, and its place within the series (keep 0.4, 0.6, ...) the shade of that
hue, darkest first (the smallest budget, the shortest run). CLM is black and grey: the reference. Legends go below the panels, in as
many columns as fit the figure's width, or in one column beside them when below they would be
taller than 45% of the figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slm_cli.errors import SlmError
from slm_cli.report.table import Table

# Config columns that move a configuration along its strategy's curve rather than starting a new
# series: the token budget and the training length.
ALONG_SERIES = ("selection.ratio", "selection.alpha", "selection.window_alpha", "trainer.max_steps",
                "trainer.max_tokens")
# (line style, marker) per method family, in order of appearance; CLM always the first.
LOOKS = [("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"), ((0, (5, 1.5, 1, 1.5, 1, 1.5)), "v"),
         ((0, (8, 2)), "P"), ((0, (1, 1)), "X"), ((0, (3, 1, 1, 1)), "*")]
LOSS = "loss (nats/token)"
MANY = 7  # from this many curves on a panel, lines get thinner and lighter


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
    linestyle: Any
    marker: str
    family: str = ""
    order: int = 0   # where the configuration comes in legends and lists: series by series

    def width(self, curves: int) -> float:
        """Line width on a panel of ``curves`` curves: thinner where many overlap."""
        return 1.8 if curves < MANY else 1.2


def _shade(color: Any, j: int, k: int) -> tuple[float, float, float]:
    """The ``j``-th of ``k`` shades of ``color``: the colour itself first, lighter after (mixed
    with white up to 50%), so that the members of one series stay one hue."""
    from matplotlib.colors import to_rgb

    mix = 0.5 * j / (k - 1) if k > 1 else 0.0
    return tuple(c + (1 - c) * mix for c in to_rgb(color))  # type: ignore[return-value]


def _sort_key(value: Any) -> tuple[int, float, str]:
    """Numbers in order, then text, then absent values."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value)) if value is not None else (2, 0.0, "")


def styles(table: Table) -> tuple[dict[int, Style], dict[str, list[int]]]:
    """Row index -> its style, and series label -> its row indices. A series is named with its
    budget when all its configurations share one ("ESLM (loss, keep 0.6)" at 100 and 200 steps),
    else without ("ESLM (loss)" at keeps 0.4 to 0.8). CLM's series comes first."""
    plt = pyplot()
    skip = [c for c in table.columns if c in ALONG_SERIES]
    keyed: dict[str, list[int]] = {}
    for i, row in enumerate(table.rows):
        keyed.setdefault(table.label(row, skip=skip, budget=False), []).append(i)
    along = [table.columns.index(c) for c in skip]
    for members in keyed.values():  # along a series by budget and length, smallest first
        members.sort(key=lambda i: [_sort_key(table.rows[i].key[k]) for k in along])
    keyed = dict(sorted(keyed.items(), key=lambda kv: table.method(table.rows[kv[1][0]]).family != "CLM"))
    families = list(dict.fromkeys(["CLM", *(table.method(row).family for row in table.rows)]))
    hues = plt.get_cmap("tab10" if len(keyed) <= 10 else "tab20")
    out, series, hue, order = {}, {}, 0, 0
    per_family: dict[str, int] = {}
    for key, members in keyed.items():
        first = table.rows[members[0]]
        one_budget = len({table.method(table.rows[i]).name for i in members}) == 1
        series[table.label(first, skip=skip) if one_budget else key] = members
        family = table.method(first).family
        if family == "CLM":
            base = (0.1, 0.1, 0.1)
        else:
            base, hue = hues(hue % hues.N), hue + 1
        # A family's later series take another look (CLM on RHO-1's grid beside CLM: both are grey).
        k = per_family[family] = per_family.get(family, -1) + 1
        linestyle, marker = LOOKS[(families.index(family) + 3 * k) % len(LOOKS)]
        for j, i in enumerate(members):
            out[i] = Style(table.label(table.rows[i]), _shade(base, j, len(members)), linestyle, marker, family, order)
            order += 1
    return out, series


def save(fig: Any, path: Path) -> Path:
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


def legend(fig: Any, axes: Sequence[Any]) -> None:
    """One legend for the figure, with each label once, that leaves the panels their size: below
    them, in as many columns as fit the figure's width; beside them in one column when below it
    would be taller than 45% of the figure. The PNG is cropped to include it
    (savefig's bbox_inches="tight")."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    fig.tight_layout()
    if "Pareto front" in seen:  # after the series it is drawn through
        seen["Pareto front"] = seen.pop("Pareto front")
    if not seen:
        return
    renderer = fig.canvas.get_renderer()
    for ncol in range(min(len(seen), 4), 0, -1):
        box = fig.legend(list(seen.values()), list(seen), loc="upper center", ncol=ncol, frameon=False,
                         bbox_to_anchor=(0.5, 0.0), fontsize=9)
        extent = box.get_window_extent(renderer)
        if extent.width <= fig.get_figwidth() * fig.dpi:
            if extent.height <= 0.45 * fig.get_figheight() * fig.dpi:
                return
            box.remove()
            break  # fewer columns only make it taller
        box.remove()
    fig.legend(list(seen.values()), list(seen), loc="center left", ncol=1, frameon=False,
               bbox_to_anchor=(1.0, 0.5), fontsize=9)


def eng(ax: Any, axis: str = "x") -> None:
    """SI prefixes on a linear axis (1.5G rather than 1.5e9 in a corner), with few enough ticks
    that their labels do not run into each other."""
    from matplotlib.ticker import EngFormatter, MaxNLocator

    target = ax.xaxis if axis == "x" else ax.yaxis
    if target.get_scale() == "linear":
        target.set_major_formatter(EngFormatter(sep=""))
        target.set_major_locator(MaxNLocator(nbins=6))


# ---- point labels that do not overlap ----------------------------------------------------------------

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in display pixels


def _overlap(a: Box, b: Box) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _candidates(w: float, h: float) -> list[tuple[float, float]]:
    """Lower-left corners of a w × h label around its point (at 0, 0): right, above, left, below
    and the corners, nearest first."""
    out = []
    for r in (5.0, 12.0, 22.0, 35.0, 50.0, 70.0, 95.0):
        out += [(r, -h / 2), (r, r / 2), (-w / 2, r), (-w - r, r / 2), (-w - r, -h / 2), (-w - r, -h - r / 2),
                (-w / 2, -h - r), (r, -h - r / 2)]
    return out


def place_labels(anchors: Sequence[tuple[float, float]], sizes: Sequence[tuple[float, float]],
                 bounds: Box, marker: float = 5.0, soft: Sequence[Box] = ()) -> list[tuple[float, float]]:
    """Offsets (pixels, of each label's lower-left corner from its point) that keep labels off each
    other, off every point's marker (a square of half-side ``marker``) and inside ``bounds``, and
    where they can, off the ``soft`` boxes (the lines drawn): greedy, each label at the nearest
    free place of :func:`_candidates`; where none is free, the place of least overlap."""
    markers = [(x - marker, y - marker, x + marker, y + marker) for x, y in anchors]
    placed: list[Box] = []
    out = []
    for (x, y), (w, h) in zip(anchors, sizes, strict=True):
        best: tuple[float, tuple[float, float], Box] | None = None
        for dx, dy in _candidates(w, h):
            box = (x + dx, y + dy, x + dx + w, y + dy + h)
            hard = sum(_overlap(box, o) for o in placed) + sum(_overlap(box, m) for m in markers)
            hard += w * h - _overlap(box, bounds)  # the part outside the axes
            # any hard overlap outweighs every free place; a line under a label is worth some distance
            cost = 1e3 * hard + 0.25 * sum(_overlap(box, o) for o in soft) + 0.5 * math.hypot(dx + w / 2, dy + h / 2)
            if best is None or cost < best[0]:
                best = (cost, (dx, dy), box)
        assert best is not None
        placed.append(best[2])
        out.append(best[1])
    return out


def _along(points: Sequence[tuple[float, float]], step: float = 6.0, half: float = 1.5) -> list[Box]:
    """Small boxes every ``step`` pixels along a polyline (display pixels): what a label should
    not cover of a line."""
    out = []
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        n = max(1, int(math.hypot(x1 - x0, y1 - y0) / step))
        out += [(x0 + (x1 - x0) * k / n - half, y0 + (y1 - y0) * k / n - half,
                 x0 + (x1 - x0) * k / n + half, y0 + (y1 - y0) * k / n + half) for k in range(n + 1)]
    return out


def label_points(ax: Any, points: Sequence[tuple[float, float, str, Any]],
                 lines: Sequence[Sequence[tuple[float, float]]] = ()) -> None:
    """Name points of ``ax`` (x, y in data units, text, colour) without overlap, and off the
    ``lines`` (data units) where there is room: the figure is drawn once so that the axes' limits
    and scales are final, the labels are measured and placed by :func:`place_labels`, and a label
    set away from its point gets a thin leader line."""
    if not points:
        return
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [ax.annotate(text, (x, y), xytext=(0, 0), textcoords="offset points", fontsize=8, color=color,
                         ha="left", va="bottom", bbox={"boxstyle": "square,pad=0.1", "facecolor": "white",
                                                       "edgecolor": "none", "alpha": 0.75})
             for x, y, text, color in points]
    sizes = [(t.get_window_extent(renderer).width, t.get_window_extent(renderer).height) for t in texts]
    anchors = [tuple(ax.transData.transform((x, y))) for x, y, _, _ in points]
    box = ax.get_window_extent(renderer)
    soft = [b for line in lines for b in _along([tuple(ax.transData.transform(p)) for p in line])]
    offsets = place_labels(anchors, sizes, (box.x0, box.y0, box.x1, box.y1), soft=soft)
    per_point = 72.0 / fig.dpi
    for text, (dx, dy), (w, h), (_, _, _, color) in zip(texts, offsets, sizes, points, strict=True):
        text.set_position((dx * per_point, dy * per_point))
        # the nearest point of the label's box to its point: where a leader line starts
        near = (min(max(0.0, dx), dx + w), min(max(0.0, dy), dy + h))
        if max(abs(near[0]), abs(near[1])) > 14:  # set away from its point: show which point it names
            ax.annotate("", text.xy, xytext=(near[0] * per_point, near[1] * per_point), textcoords="offset points",
                        arrowprops={"arrowstyle": "-", "color": color, "linewidth": 0.6, "alpha": 0.7,
                                    "shrinkA": 0, "shrinkB": 4})
