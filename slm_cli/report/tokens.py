"""`slm tokens`: one self-contained HTML page showing what a model and a selection strategy make of a
text, token by token (docs/report.md#slm-tokens).

Each token is drawn in the text with its background coloured by one per-token value: the model's
loss, its predictive entropy, a reference model's loss, or the excess loss ℓ − ℓ_ref that RHO-1
ranks by (arXiv 2404.07965). The tokens the strategy would keep are underlined: the real strategy,
built from conf/selection/*.yaml, whose ``features()`` and ``select()`` (slm_cli/selection/base.py)
run on the statistics of slm_cli/loss.py's ``token_stats`` (and the reference's own ``token_stats``),
with the page's tokens as the whole batch. Hovering a token shows all of its values.

The page is plain HTML and CSS (no script, font or request of its own): each token is one
``<span class="tok">`` holding its decoded text, so the spans' text in order is the text itself
(``white-space: pre-wrap`` keeps spaces and newlines), and ``data-*`` attributes holding its values.

The pieces here (:func:`token_pieces`, :class:`Scale`, :func:`tokens_html`, :func:`legend_html`,
:data:`STYLE`) are also how `slm dynamics` (slm_cli/report/dynamics.py) shows tokens in context.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from slm_cli.errors import SlmError
from slm_cli.loss import TokenStats, token_stats
from slm_cli.outputs import atomic_write
from slm_cli.report import html

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from slm_cli.model.gpt import GPT
    from slm_cli.reference.models import ReferenceModel
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


# ---- the statistics ---------------------------------------------------------------------------

@torch.no_grad()
def model_stats(model: GPT, input_ids: torch.Tensor, labels: torch.Tensor, entropy: bool = True) -> TokenStats:
    """slm_cli/loss.py's per-token statistics of (B, T) windows, flat (B·T rows): the loss over the
    padded head, exactly as training and `slm eval` compute it."""
    return model(input_ids, head=lambda h, w: token_stats(h.reshape(-1, h.shape[-1]), w, labels.reshape(-1),
                                                          entropy=entropy, keep_probs=False))


@dataclass
class TokenView:
    """What the page shows: the predicted tokens, their text, their values and the strategy's mask."""

    ids: list[int]
    pieces: list[str]
    values: dict[str, np.ndarray]  # name -> (n,) float64: loss, entropy[, reference_loss, reference_entropy, excess]
    selected: np.ndarray  # (n,) bool
    before: str = ""  # the context token before the first shown one (a corpus window), greyed


def build_strategy(selection_cfg: DictConfig) -> Selection:
    """The strategy of conf/selection/<name>.yaml with the user's settings. A RHO-1 reference is run
    here on the page's tokens, so the strategy reads its losses from the batch (mode precomputed)
    rather than loading the reference a second time."""
    from slm_cli.train import build

    settings = OmegaConf.masked_copy(selection_cfg, [k for k in selection_cfg if k != "scope"])
    if "reference" in settings:
        settings.reference.mode = "precomputed"
    return build(settings)


def compute(model: GPT, input_ids: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor,
            strategy: Selection, reference: ReferenceModel | None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-token values of one (1, n) window and the strategy's mask over its n tokens."""
    stats = model_stats(model, input_ids, labels)
    values = {"loss": stats.loss.double().numpy(), "entropy": stats.entropy.double().numpy()}
    batch: dict[str, torch.Tensor] = {"input_ids": input_ids, "labels": labels, "positions": positions}
    if reference is not None:
        ref_loss, ref_entropy = reference.token_stats(input_ids, labels)
        batch["ref_loss"], batch["ref_entropy"] = ref_loss.float().cpu(), ref_entropy.float().cpu()
        values["reference_loss"] = ref_loss.reshape(-1).double().cpu().numpy()
        values["reference_entropy"] = ref_entropy.reshape(-1).double().cpu().numpy()
        values["excess"] = values["loss"] - values["reference_loss"]
    features = strategy.features(stats if strategy.reads_model else None, batch)
    mask = strategy.select(features).mask.reshape(-1).cpu().numpy().astype(bool)
    return values, mask


# ---- the command ------------------------------------------------------------------------------

def _text(cfg: DictConfig) -> str | None:
    given = [k for k in ("text", "file", "split") if cfg.get(k) is not None]
    if len(given) != 1:
        which = "none" if not given else " and ".join(f"{k}=" for k in given)
        raise SlmError(f"slm tokens shows one text, but {which} was given: pass text=\"...\", file=<a .txt file> "
                       "or split=val window=<K>")
    if cfg.file is not None:
        path = Path(str(cfg.file)).expanduser()
        if not path.is_file():
            raise SlmError(f"file={cfg.file} does not exist: pass a text file")
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise SlmError(f"file={cfg.file} is not UTF-8 text: pass a text file") from None
    return None if cfg.text is None else str(cfg.text)


def _check(cfg: DictConfig) -> None:
    from slm_cli.config import is_int, is_number

    if cfg.value not in VALUES:
        raise SlmError(f"value={cfg.value} is not known: use one of {', '.join(VALUES)}")
    if cfg.split is not None and cfg.split not in ("val", "train"):
        raise SlmError(f"split={cfg.split} is not a split: use split=val or split=train")
    if not (is_int(cfg.window) and cfg.window >= 0):
        raise SlmError(f"window={cfg.window} must be a window index >= 0: e.g. window=0")
    for key in ("vmin", "vmax"):
        if cfg[key] is not None and not is_number(cfg[key]):
            raise SlmError(f"{key}={cfg[key]} must be a number or null")
    if not cfg.out:
        raise SlmError("out= is empty: pass the page's file name, e.g. out=tokens.html")


def _window(cfg: DictConfig, model: GPT, tokenizer: Tokenizer, eos: int | None, text: str | None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, labels, positions), each of shape (1, n): the model predicts labels from input_ids."""
    block = model.config.block_size
    if text is not None:
        tokenizer.encode_special_tokens = True  # as `slm prepare`: "<|endoftext|>" in a text is text
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if not ids:
            raise SlmError("the text is empty: pass text=\"...\" with at least one token")
        if eos is None:
            raise SlmError(f"the tokenizer of {cfg.ckpt_path} has no end-of-text token to start the text from: "
                           "pass split=val window=<K> instead")
        if len(ids) > block:
            raise SlmError(f"the text is {len(ids)} tokens but the model's context is {block} tokens: shorten it to "
                           f"{block} tokens or fewer (or show a corpus window: split=val window=<K>)")
        # The text is a document's start, as in training, where every document follows an EOS.
        window = [eos, *ids]
        return (torch.tensor([window[:-1]]), torch.tensor([window[1:]]), torch.arange(1, len(window))[None])
    from slm_cli.data.prepare import prepare
    from slm_cli.data.windows import ValWindows

    prepared = prepare(cfg.data, cfg.paths, tokenizer_spec=str(cfg.ckpt_path))
    windows = ValWindows(prepared.tokens(cfg.split), block)
    if cfg.window >= len(windows):
        raise SlmError(f"window={cfg.window} is past the end of the {cfg.split} split of {prepared.dir} "
                       f"({len(windows)} windows of {block} tokens): pass window=0..{len(windows) - 1}")
    item = windows[int(cfg.window)]
    return item["input_ids"][None], item["labels"][None], item["positions"][None]


def _reference(cfg: DictConfig, tokenizer_json: str, strategy: Selection) -> ReferenceModel | None:
    from slm_cli.selection.rho1 import Rho1

    spec = cfg.reference
    if spec is None:
        if cfg.value in ("reference_loss", "excess"):
            raise SlmError(f"value={cfg.value} needs a reference model: pass reference=<checkpoint> (or "
                           "selection=rho1 selection.reference.ckpt_path=<checkpoint>)")
        if isinstance(strategy, Rho1):
            raise SlmError("selection=rho1 ranks tokens by a reference model's losses: pass "
                           "selection.reference.ckpt_path=<reference checkpoint, run dir or Hugging Face folder>")
        return None
    from tokenizers import Tokenizer

    from slm_cli.data.tokenizer import tokenizer_sha256
    from slm_cli.reference.models import load

    reference = load(str(spec))
    if reference.tokenizer_sha256 != tokenizer_sha256(Tokenizer.from_str(tokenizer_json)):
        raise SlmError(f"reference {spec} uses another tokenizer than {cfg.ckpt_path}: pass a reference trained "
                       "with the same tokenizer (data.tokenizer=<the model's checkpoint>)")
    return reference


def describe_strategy(strategy: Selection, n_selected: int, n: int) -> str:
    settings = [f"{k}={getattr(strategy, k)}" for k in ("ratio", "alpha", "score") if hasattr(strategy, k)]
    return (f"underlined: the {n_selected} of {n} tokens that selection={strategy.name}"
            f"{' (' + ', '.join(settings) + ')' if settings else ''} keeps, with this text as its batch")


def view(cfg: DictConfig) -> tuple[TokenView, dict[str, Any]]:
    """The page's tokens and values, and what produced them."""
    from tokenizers import Tokenizer

    from slm_cli.data.tokenizer import eos_id
    from slm_cli.model.load import load_gpt

    _check(cfg)
    text = _text(cfg)
    strategy = build_strategy(cfg.selection)
    model, entry = load_gpt(str(cfg.ckpt_path))
    reference = _reference(cfg, entry["tokenizer_json"], strategy)
    tokenizer = Tokenizer.from_str(entry["tokenizer_json"])
    try:
        eos = eos_id(tokenizer, ((entry.get("config") or {}).get("data") or {}).get("eos_token"))
    except SlmError:
        eos = None
    input_ids, labels, positions = _window(cfg, model, tokenizer, eos, text)
    if reference is not None and labels.shape[1] > reference.block_size:
        raise SlmError(f"the text is {labels.shape[1]} tokens but the context of reference {reference.spec} is "
                       f"{reference.block_size} tokens: shorten the text to {reference.block_size} tokens or fewer")
    values, mask = compute(model, input_ids, labels, positions, strategy, reference)
    ids = labels[0].tolist()
    if text is not None:
        pieces = token_pieces(tokenizer, ids)
        before = ""
    else:  # decode with the context token, which may hold the first bytes of the first shown character
        pieces = token_pieces(tokenizer, [int(input_ids[0, 0]), *ids])
        before, pieces = pieces[0], pieces[1:]
    info = {"checkpoint": str(cfg.ckpt_path), "model": model.config, "strategy": strategy,
            "source": "text" if text is not None else f"{cfg.split} window {cfg.window}",
            "reference": None if reference is None else reference.spec}
    return TokenView(ids=ids, pieces=pieces, values=values, selected=mask, before=before), info


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


def tokens(cfg: DictConfig) -> Path:
    """`slm tokens`: write the page; returns its path."""
    token_view, info = view(cfg)
    text = page(token_view, info, str(cfg.value), cfg.vmin, cfg.vmax)
    out = atomic_write(Path(str(cfg.out)), lambda f: f.write(text.encode()))
    k, n = int(token_view.selected.sum()), len(token_view.ids)
    print(f"tokens: {n} tokens, {k} selected by {info['strategy'].name}, mean {LABELS[cfg.value]} "
          f"{float(token_view.values[cfg.value].mean()):.4f} -> {out}")
    return out
