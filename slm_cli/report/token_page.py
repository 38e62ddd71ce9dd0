"""The HTML of token pages: a text drawn token by token, each token's background coloured by one
per-token value, with a colour bar and hover text (docs/report.md#slm-tokens).

The page is plain HTML and CSS (no script, font or request of its own): each token is one
``<span class="tok">`` holding its decoded text, so the spans' text in order is the text itself
(``white-space: pre-wrap`` keeps spaces and newlines), and ``data-*`` attributes holding its values.

`slm tokens` (slm_cli/report/tokens.py) computes the values and draws its page with :func:`page`;
the pieces (:func:`token_pieces`, :class:`Scale`, :func:`tokens_html`, :func:`legend_html`,
:data:`STYLE`) are also how `slm dynamics` (slm_cli/report/dynamics_page.py) shows tokens in context.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import TYPE_CHECKING, Any

import numpy as np

from slm_cli.errors import SlmError
from slm_cli.report import html

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from slm_cli.selection.base import Selection

VALUES = ("loss", "entropy", "reference_loss", "excess")
# How each value is named on the page, and whether its scale is signed (centred on 0).
LABELS = {"loss": "loss", "entropy": "entropy", "reference_loss": "reference loss",
          "reference_entropy": "reference entropy", "excess": "excess loss"}
SIGNED = {"excess"}

# Colour scales as (position in [0, 1], RGB) stops, interpolated linearly: a yellow-to-red sequential
# scale for values that start at 0 (after ColorBrewer's YlOrRd) and a blue-white-red diverging one
# centred on 0 for signed values (after RdBu).
SEQUENTIAL = [(0.0, (255, 255, 229)), (0.15, (255, 237, 160)), (0.3, (254, 217, 118)), (0.45, (254, 178, 76)),
              (0.6, (253, 141, 60)), (0.75, (252, 78, 42)), (0.9, (227, 26, 28)), (1.0, (177, 0, 38))]
DIVERGING = [(0.0, (33, 102, 172)), (0.2, (103, 169, 207)), (0.4, (209, 229, 240)), (0.5, (247, 247, 247)),
             (0.6, (253, 219, 199)), (0.8, (239, 138, 98)), (1.0, (178, 24, 43))]

STYLE = """
<style>
.tokens { font: 14px/2.05 ui-monospace, "DejaVu Sans Mono", "Liberation Mono", Menlo, Consolas, monospace;
          white-space: pre-wrap; overflow-wrap: anywhere; border: 1px solid #ddd; border-radius: 6px;
          padding: .7em .9em; background: #fff; margin: .8em 0; tab-size: 4; }
.tokens .tok { padding: 1px 0; box-shadow: inset 1px 0 0 rgba(255,255,255,.7); }
.tokens .tok:hover { outline: 2px solid #0969da; outline-offset: 0; position: relative; z-index: 1; }
.tokens .tok.sel { box-shadow: inset 1px 0 0 rgba(255,255,255,.7), inset 0 -3px 0 #1b1f24; }
.tokens .tok.mark { outline: 2px solid #1b1f24; outline-offset: 1px; }
.tokens .tok.nl::before { content: "\\21B5"; color: #8c959f; font-size: .85em; }
.tokens .ctx { color: #8c959f; }
.legend { display: flex; flex-wrap: wrap; align-items: flex-start; gap: 1.2em 2.4em; margin: .6em 0 .2em;
          font-size: 13px; color: #333; }
.legend .bar { width: 320px; height: 14px; border: 1px solid #bbb; border-radius: 2px; }
.legend .ticks { position: relative; width: 320px; height: 1.3em; font-variant-numeric: tabular-nums; }
.legend .ticks span { position: absolute; transform: translateX(-50%); white-space: nowrap; top: 2px; }
.legend .ticks span::before { content: ""; position: absolute; left: 50%; top: -5px; height: 4px;
                              border-left: 1px solid #555; }
.legend .title { margin-bottom: 3px; font-weight: 600; }
.legend .swatch { display: inline-block; font: 14px ui-monospace, "DejaVu Sans Mono", monospace;
                  padding: 0 .35em; background: #fed976; margin-right: .4em; }
.legend .swatch.sel { box-shadow: inset 0 -3px 0 #1b1f24; }
.legend .swatch.mark { outline: 2px solid #1b1f24; outline-offset: 1px; }
.legend .cat { display: inline-block; width: 1.1em; height: 1.1em; vertical-align: -.2em; margin: 0 .3em 0 .9em;
               border: 1px solid #bbb; border-radius: 2px; }
.examples { list-style: none; padding: 0; margin: .4em 0 1em; }
.examples li { margin: .25em 0; display: flex; align-items: center; gap: 1em; }
.examples .tokens { margin: 0; padding: .15em .6em; flex: 1; }
.examples .note { flex: 0 0 15em; font-size: 12px; color: #57606a; font-variant-numeric: tabular-nums;
                  white-space: nowrap; }
</style>
"""


# ---- decoding ---------------------------------------------------------------------------------

def token_pieces(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """The text of each token, such that ``"".join(pieces) == tokenizer.decode(ids)``.

    Decoding tokens one by one would break characters whose UTF-8 bytes span two tokens (each half
    decodes to U+FFFD). Decoding growing prefixes instead, a character goes to the token that
    completes it (the token holding only its first bytes gets an empty piece)."""
    ids = [int(i) for i in ids]
    pieces: list[str] = []
    done = ""
    for i in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:i], skip_special_tokens=False)
        if i < len(ids):
            text = text.rstrip("\ufffd")  # an unfinished character: its other bytes come with the next token
        if not text.startswith(done):  # a decoder that rewrites earlier text (e.g. a WordPiece cleanup)
            return [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
        pieces.append(text[len(done):])
        done = text
    return pieces


# ---- colours ----------------------------------------------------------------------------------

def _nice_step(span: float, ticks: int) -> float:
    raw = span / max(ticks, 1)
    power = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)


def _round_up(value: float, step: float) -> float:
    return math.ceil(value / step - 1e-9) * step


@dataclass
class Scale:
    """A colour scale from ``lo`` to ``hi`` (values outside are drawn at the ends)."""

    lo: float
    hi: float
    stops: list[tuple[float, tuple[int, int, int]]] = field(default_factory=lambda: SEQUENTIAL)

    @classmethod
    def fit(cls, values: np.ndarray, signed: bool = False, vmin: float | None = None,
            vmax: float | None = None) -> Scale:
        """A scale covering ``values``: from 0 (or below, if any value is negative) to their maximum,
        or symmetric around 0 for a signed value; ``vmin``/``vmax`` fix either end (for pages that
        should share one scale)."""
        finite = values[np.isfinite(values)]
        top = float(finite.max()) if finite.size else 1.0
        bottom = float(finite.min()) if finite.size else 0.0
        # The free ends are rounded outwards to a tick, so that the bar ends on a number.
        if signed:
            reach = max(abs(top), abs(bottom)) or 1.0
            reach = _round_up(reach, _nice_step(2 * reach, 4))
            lo, hi, stops = -reach, reach, DIVERGING
        else:
            lo = min(0.0, bottom)
            hi = top if top > lo else lo + 1.0
            step = _nice_step(hi - lo, 4)
            lo, hi, stops = -_round_up(-lo, step) if lo < 0 else 0.0, _round_up(hi, step), SEQUENTIAL
        lo = lo if vmin is None else float(vmin)
        hi = hi if vmax is None else float(vmax)
        if not hi > lo:
            raise SlmError(f"the colour scale runs from {lo} to {hi}: pass vmin < vmax")
        return cls(lo, hi, stops)

    def rgb(self, value: float) -> tuple[int, int, int]:
        t = (value - self.lo) / (self.hi - self.lo) if math.isfinite(value) else 0.0
        t = min(max(t, 0.0), 1.0)
        for (t0, c0), (t1, c1) in zip(self.stops, self.stops[1:], strict=False):
            if t <= t1:
                w = (t - t0) / (t1 - t0)
                return tuple(round(a + w * (b - a)) for a, b in zip(c0, c1, strict=True))  # type: ignore[return-value]
        return self.stops[-1][1]

    def css(self, value: float) -> str:
        """``background`` and a readable text colour for ``value``."""
        r, g, b = self.rgb(value)
        luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b  # dark backgrounds get white text
        return f"background:#{r:02x}{g:02x}{b:02x};color:{'#fff' if luminance < 140 else '#1b1f24'}"

    def gradient(self) -> str:
        stops = ", ".join(f"#{r:02x}{g:02x}{b:02x} {100 * t:.0f}%" for t, (r, g, b) in self.stops)
        return f"linear-gradient(to right, {stops})"

    def ticks(self, count: int = 5) -> list[float]:
        step = _nice_step(self.hi - self.lo, count)
        first = math.ceil(self.lo / step - 1e-9) * step
        return [first + i * step for i in range(int((self.hi - first) / step + 1e-9) + 1)]


def fmt(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.3f}"


def legend_html(scale: Scale, title: str, marks: Sequence[tuple[str, str]] = ()) -> str:
    """The colour bar with numbers under it, and a swatch per mark: (CSS class, explanation)."""
    ticks = "".join(f'<span style="left:{100 * (t - scale.lo) / (scale.hi - scale.lo):.2f}%">{t:g}</span>'
                    for t in scale.ticks())
    parts = [f'<div><div class="title">{escape(title)}</div><div class="bar" style="background:{scale.gradient()}">'
             f'</div><div class="ticks">{ticks}</div></div>']
    for css_class, text in marks:
        parts.append(f'<div><span class="swatch {escape(css_class)}">tok</span>{escape(text)}</div>')
    return f'<div class="legend">{"".join(parts)}</div>'


# ---- the token spans --------------------------------------------------------------------------

def _attr(name: str) -> str:
    return "data-" + name.replace("_", "-")


def tokens_html(pieces: Sequence[str], styles: Sequence[str], titles: Sequence[str],
                data: Sequence[Mapping[str, str]], classes: Sequence[str] = (), before: str = "",
                after: str = "") -> str:
    """One ``<div class="tokens">`` with a ``<span class="tok">`` per token: its text, its inline
    style (colour), its hover text and ``data-*`` attributes; ``classes`` adds CSS classes per token
    ("sel": underlined, "mark": outlined). ``before``/``after``: grey context text around them."""
    out = []
    if before:
        out.append(f'<span class="ctx">{escape(before)}</span>')
    for i, piece in enumerate(pieces):
        names = ["tok"]
        if i < len(classes) and classes[i]:
            names.append(classes[i])
        if "\n" in piece:
            names.append("nl")  # a visible ↵ before it (CSS content: not part of the text)
        attrs = "".join(f' {_attr(k)}="{escape(v)}"' for k, v in data[i].items())
        out.append(f'<span class="{" ".join(names)}" style="{styles[i]}" title="{escape(titles[i])}"{attrs}>'
                   f"{escape(piece)}</span>")
    if after:
        out.append(f'<span class="ctx">{escape(after)}</span>')
    return f'<div class="tokens">{"".join(out)}</div>'


# ---- the page ---------------------------------------------------------------------------------

@dataclass
class TokenView:
    """What the page shows: the predicted tokens, their text, their values and the strategy's mask."""

    ids: list[int]
    pieces: list[str]
    values: dict[str, np.ndarray]  # name -> (n,) float64: loss, entropy[, reference_loss, reference_entropy, excess]
    selected: np.ndarray  # (n,) bool
    before: str = ""  # the context token before the first shown one (a corpus window), greyed


def describe_strategy(strategy: Selection, n_selected: int, n: int) -> str:
    settings = [f"{k}={getattr(strategy, k)}" for k in ("ratio", "alpha", "score") if hasattr(strategy, k)]
    return (f"underlined: the {n_selected} of {n} tokens that selection={strategy.name}"
            f"{' (' + ', '.join(settings) + ')' if settings else ''} keeps, with this text as its batch")


def _hover(i: int, view: TokenView, piece: str) -> str:
    lines = [f"#{i}  {piece!r}  (id {view.ids[i]})"]
    lines += [f"{LABELS[k]}: {fmt(float(v[i]))}" for k, v in view.values.items()]
    lines.append("selected: " + ("yes" if view.selected[i] else "no"))
    return "\n".join(lines)


def page(view: TokenView, info: dict[str, Any], value: str, vmin: float | None = None,
         vmax: float | None = None) -> str:
    """The whole HTML page."""
    shown = view.values[value]
    scale = Scale.fit(shown, signed=value in SIGNED, vmin=vmin, vmax=vmax)
    n, k = len(view.ids), int(view.selected.sum())
    spans = tokens_html(
        view.pieces,
        styles=[scale.css(float(v)) for v in shown],
        titles=[_hover(i, view, p) for i, p in enumerate(view.pieces)],
        data=[{"i": str(i), "token_id": str(view.ids[i]), "selected": "1" if view.selected[i] else "0",
               **{name: f"{float(v[i]):.6f}" for name, v in view.values.items()}} for i in range(n)],
        classes=["sel" if s else "" for s in view.selected],
        before=view.before,
    )
    legend = legend_html(scale, f"colour: {LABELS[value]} (nats)",
                         [("sel", describe_strategy(info["strategy"], k, n))])
    cfg = info["model"]
    meta = (f"{info['checkpoint']}: {cfg.n_layer} layers, n_embd {cfg.n_embd}, context {cfg.block_size}"
            + (f"; reference {info['reference']}" if info["reference"] else "") + f"; {info['source']}, {n} tokens")
    rows = []
    for name, v in view.values.items():
        sel = v[view.selected]
        rest = v[~view.selected]
        rows.append([LABELS[name], fmt(float(v.mean())), fmt(float(sel.mean())) if sel.size else "n/a",
                     fmt(float(rest.mean())) if rest.size else "n/a"])
    summary = html.table(["mean (nats)", f"all {n} tokens", f"selected ({k})", f"not selected ({n - k})"], rows,
                         align="lrrr")
    hint = html.paragraph("Hover over a token for all its values. Tokens are the model's predictions: each is "
                          "scored given the tokens before it.", "meta")
    return html.page(f"slm tokens: {LABELS[value]}", [STYLE, html.paragraph(meta, "meta"), legend, spans, hint,
                                                     summary])
