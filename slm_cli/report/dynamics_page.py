"""The outputs of `slm dynamics` (slm_cli/report/dynamics.py) a person reads: dynamics.png (each
class's mean loss across checkpoints, and the class shares beside the paper's), dynamics.html (the
figure, the shares and example tokens of each class in context, drawn with
slm_cli/report/token_page.py's spans) and the summary printed to the terminal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from slm_cli.report import html
from slm_cli.report.dynamics_classes import CLASSES, MEANING, PAPER_SHARES, Classes, fit_lines
from slm_cli.report.token_page import STYLE, Scale, fmt, legend_html, token_pieces, tokens_html

COLORS = {"H→H": "#cf222e", "L→H": "#e16f24", "H→L": "#0969da", "L→L": "#6e7781"}


def plot(steps: list[int], means: dict[str, list[float] | None], table: dict[str, dict[str, Any]],
         x: np.ndarray, path: Path) -> Path:
    """Left: each class's mean loss across checkpoints, with its least-squares line (the mean of
    its tokens' lines). Right: the class shares beside the paper's."""
    from slm_cli.report.plot_style import pyplot

    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.3), gridspec_kw={"width_ratios": [1.6, 1]})
    for c in CLASSES:
        if means[c] is None:
            continue
        y = np.asarray(means[c])
        ax.plot(steps, y, marker="o", color=COLORS[c], linewidth=1.8,
                label=f"{c} ({100 * table[c]['share']:.1f}%, {MEANING[c]})")
        slope, intercept = fit_lines(x, y[:, None])
        ax.plot([steps[0], steps[-1]], [float(slope[0] * x[0] + intercept[0]), float(slope[0] * x[-1] + intercept[0])],
                color=COLORS[c], linestyle="--", linewidth=1, alpha=0.7)
    ax.set_xlabel("optimizer step of the checkpoint")
    ax.set_ylabel("mean loss of the class's tokens (nats)")
    ax.set_title("held-out token loss by class (dashed: least-squares trend)", fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9, frameon=False, loc="best")
    pos = np.arange(len(CLASSES))
    ours = [100 * table[c]["share"] for c in CLASSES]
    paper = [100 * PAPER_SHARES[c] for c in CLASSES]
    bx.bar(pos - 0.2, ours, width=0.4, color=[COLORS[c] for c in CLASSES], label="this run")
    bx.bar(pos + 0.2, paper, width=0.4, color="white", edgecolor=[COLORS[c] for c in CLASSES], hatch="//",
           label="RHO-1 (TinyLlama-1B)")
    for p, v in zip(pos, ours, strict=True):
        bx.annotate(f"{v:.0f}%", (p - 0.2, v), textcoords="offset points", xytext=(0, 2), ha="center", fontsize=8)
    bx.set_xticks(pos, CLASSES)
    bx.set_ylabel("share of held-out tokens (%)")
    bx.set_title("class shares", fontsize=11)
    bx.legend(fontsize=9, frameon=False)
    bx.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    # No "Software" text chunk: the PNG does not change with the matplotlib version.
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path


def _examples_html(classes: Classes, stream: np.ndarray, losses: np.ndarray, steps: list[int], tokenizer: Any,
                   count: int, context: int) -> list[str]:
    """Per class, ``count`` of its tokens spread evenly over the held-out text, each in its context,
    coloured by ΔL (the fitted change of loss) and outlined."""
    delta = classes.end - classes.start
    # The scale covers 98% of the tokens' |ΔL|, so that a few extreme tokens do not wash out the rest.
    reach = float(np.quantile(np.abs(delta), 0.98)) if len(delta) else 1.0
    scale = Scale.fit(np.array([-reach, reach]), signed=True)
    n = len(classes.labels)
    body = [legend_html(scale, "colour: ΔL, the fitted change of loss from the first to the last checkpoint "
                               f"(nats; beyond ±{scale.hi:g}: the end colours)",
                        [("mark", "outlined: the example token; hover over any token for its values")])]
    for i, c in enumerate(CLASSES):
        members = np.flatnonzero(classes.labels == i)
        body.append(html.heading(f"{c}: {MEANING[c]} ({len(members)} tokens, {100 * len(members) / n:.1f}%)", 3))
        if not len(members) or not count:
            continue
        picks = members[np.unique(np.linspace(0, len(members) - 1, min(count, len(members))).round().astype(int))]
        items = []
        for j in picks:
            lo, hi = max(0, j - context), min(n, j + 1 + max(1, context // 3))
            # Token j of the held-out set is stream position j + 1; decode from the token before the
            # first shown one, so that a character split across tokens is whole.
            ids = stream[lo: hi + 1].tolist()
            pieces = token_pieces(tokenizer, ids)
            before, pieces = pieces[0], pieces[1:]
            span = range(lo, hi)
            titles = [f"#{k}  {p!r}  ({CLASSES[classes.labels[k]]})\nloss at step {steps[0]}: {fmt(losses[0, k])}\n"
                      f"loss at step {steps[-1]}: {fmt(losses[-1, k])}\nfitted: {fmt(classes.start[k])} → "
                      f"{fmt(classes.end[k])} (ΔL {delta[k]:+.3f})" for k, p in zip(span, pieces, strict=True)]
            data = [{"i": str(k), "token_id": str(int(stream[k + 1])), "class": CLASSES[classes.labels[k]],
                     "delta": f"{delta[k]:.6f}"} for k in span]
            items.append("<li>" + tokens_html(pieces, [scale.css(float(delta[k])) for k in span], titles, data,
                                              classes=["mark" if k == j else "" for k in span],
                                              before=before) +
                         f'<span class="note">ΔL {delta[j]:+.2f}: {fmt(losses[0, j])} → {fmt(losses[-1, j])}</span></li>')
        body.append('<ul class="examples">' + "".join(items) + "</ul>")
    return body


def _rule_text(summary: dict[str, Any]) -> str:
    level = f"{summary['high_loss']:.3f} nats ({summary['high_loss_from']})"
    if summary["rule"] == "paper":
        return (f"rule paper: ΔL (least-squares line vs {summary['x']}, last minus first checkpoint) < −{summary['trend']:g}: "
                f"H→L, > {summary['trend']:g}: L→H; otherwise H→H if the last loss > {level}, else L→L")
    return f"rule levels: fitted loss at the first and at the last checkpoint, each H if > {level}"


def render_page(summary: dict[str, Any], png: Path, classes: Classes, stream: np.ndarray,
                losses: np.ndarray, steps: list[int], tokenizer: Any, examples: int, context: int) -> str:
    rows = [[c, MEANING[c], str(v["tokens"]), f"{100 * v['share']:.1f}%", f"{100 * v['paper_share']:.0f}%"]
            for c, v in summary["classes"].items()]
    meta = (f"{summary['run']}: {summary['tokens']} {summary['split']} tokens at {len(steps)} checkpoints "
            f"(steps {', '.join(map(str, steps))}); {_rule_text(summary)}.")
    body = [STYLE, html.paragraph(meta, "meta"),
            html.table(["class", "meaning", "tokens", "share", "RHO-1 paper (1B)"], rows, align="llrrr"),
            html.figure(png, "Mean loss of each class's tokens at each checkpoint (dashed: its least-squares trend), "
                             "and the class shares beside the paper's."),
            html.heading("Examples in context")]
    body += _examples_html(classes, stream, losses, steps, tokenizer, examples, context)
    return html.page("slm dynamics: token loss across checkpoints", body)


def print_summary(summary: dict[str, Any], out: Path) -> None:
    steps = [c["step"] for c in summary["checkpoints"]]
    print(f"dynamics: {summary['tokens']} {summary['split']} tokens at {len(steps)} checkpoints (steps "
          f"{', '.join(map(str, steps))})")
    print(f"  {_rule_text(summary)}")
    print(f"  {'class':<6}{'tokens':>8}{'share':>9}{'RHO-1 paper':>13}   mean loss first → last")
    for c, v in summary["classes"].items():
        trend = "" if v["mean_loss"] is None else f"{v['mean_loss'][0]:.3f} → {v['mean_loss'][-1]:.3f}"
        print(f"  {c:<6}{v['tokens']:>8}{100 * v['share']:>8.1f}%{100 * v['paper_share']:>12.0f}%   {trend}")
    print(f"  -> {out}")
