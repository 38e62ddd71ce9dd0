"""Self-contained HTML pages for the `slm` reports: one file with its styles inline and its
images embedded as base64 PNG, which opens from disk and makes no request of its own.

The pieces are plain functions returning HTML text, so each report composes its page as it likes:

    page("slm report", [heading("Results"), table(header, rows), figure(png, "caption")])
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from html import escape
from pathlib import Path

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 1200px; margin: 1.5em auto; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
p.meta { color: #555; margin-top: 0; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; margin: .6em 0; }
th, td { padding: 3px 6px; border-bottom: 1px solid #e4e4e4; white-space: nowrap; text-align: left; }
th { background: #f3f3f3; white-space: normal; vertical-align: bottom; min-width: 3em; }
th.num, td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
td.wrap { white-space: normal; min-width: 16em; }
td .pm { display: block; font-size: 11px; color: #666; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; font-size: 13px; margin-top: .3em; }
code { background: #f3f3f3; padding: 0 3px; border-radius: 3px; }
.status-finished { color: #1a7f37; } .status-unfinished { color: #9a6700; } .status-failed { color: #cf222e; }
"""


def page(title: str, body: Iterable[str]) -> str:
    """A complete HTML document around ``body`` (pieces of HTML text)."""
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            f"<h1>{escape(title)}</h1>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def heading(text: str, level: int = 2) -> str:
    return f"<h{level}>{escape(text)}</h{level}>"


def paragraph(text: str, css_class: str = "") -> str:
    """A paragraph of plain text (escaped); ``css_class="meta"`` for the grey line under a title."""
    cls = f' class="{escape(css_class)}"' if css_class else ""
    return f"<p{cls}>{escape(text)}</p>"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "",
          classes: dict[int, str] | None = None) -> str:
    """A table of text cells (escaped). ``align``: one letter per column, "l" or "r" (numbers);
    ``classes``: column index -> CSS class of its cells whose value is added as a suffix
    (e.g. {1: "status-"} colours a status column), or a class for the whole column."""
    classes = classes or {}

    def td(i: int, text: str) -> str:
        names = []
        if i < len(align) and align[i] == "r":
            names.append("num")
        if i in classes:
            cls = classes[i]
            names.append(f"{cls}{text}" if cls.endswith("-") else cls)
        attr = f' class="{" ".join(escape(n) for n in names)}"' if names else ""
        mean, pm, spread = str(text).partition(" ± ")
        if pm:  # "mean ± std": the spread on a second, smaller line keeps the table narrow
            return f'<td{attr}>{escape(mean)}<span class="pm">± {escape(spread)}</span></td>'
        return f"<td{attr}>{escape(str(text))}</td>"

    # dotted config keys (selection.alpha) may break after a dot
    numeric = ' class="num"'
    head = "".join(f"<th{numeric if i < len(align) and align[i] == 'r' else ''}>"
                   f"{escape(str(h)).replace('.', '.<wbr>')}</th>" for i, h in enumerate(header))
    body = "\n".join("<tr>" + "".join(td(i, c) for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f'<div class="scroll"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table></div>'


def image(png: Path | bytes, alt: str) -> str:
    """An <img> holding the PNG itself (base64 data URI)."""
    data = png.read_bytes() if isinstance(png, Path) else png
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'


def figure(png: Path | bytes, caption: str) -> str:
    return f"<figure>{image(png, caption)}<figcaption>{escape(caption)}</figcaption></figure>"
