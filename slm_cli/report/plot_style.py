"""What every figure of `slm report` shares: matplotlib on the Agg backend, one style per
configuration, the figure's legend, SI axis labels and the PNG it is saved as.

Colour names a series (the configuration without its budget and step count), line style or
marker the configuration within it; every figure uses the same mapping.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slm_cli.errors import SlmError
from slm_cli.report.table import Table

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


def eng(ax: Any, axis: str = "x") -> None:
    """SI prefixes on a linear axis (1.5G rather than 1.5e9 in a corner), with few enough ticks
    that their labels do not run into each other."""
    from matplotlib.ticker import EngFormatter, MaxNLocator

    target = ax.xaxis if axis == "x" else ax.yaxis
    if target.get_scale() == "linear":
        target.set_major_formatter(EngFormatter(sep=""))
        target.set_major_locator(MaxNLocator(nbins=6))
