"""`slm dynamics run=<run dir>`: how each token's loss moves during a run, classified as in RHO-1
(Lin et al. 2024, arXiv 2404.07965, Fig. 2 and Appendix B), docs/report.md#slm-dynamics.

1. A fixed held-out token set: the first ``tokens`` predicted tokens of the run's val split
   (stream positions 1..N), in the non-overlapping windows of the model's context that `slm eval`
   uses, so every token is scored from the same context at every checkpoint.
2. Its per-token loss (slm_cli/loss.py's ``token_stats``) at every checkpoint of the run:
   ``checkpoints/step*.ckpt`` in step order, and ``last.ckpt`` when it is a later step.
3. Per token, the least-squares line through (x_k, ℓ_k) over the K checkpoints, x_k the checkpoint's
   step (``x=step``, the default) or its index 0..K−1 (``x=index``, the paper's: their checkpoints
   are evenly spaced, every 1B tokens). The line's values at the first and last checkpoint do not
   change under an affine change of x, so the two choices agree whenever checkpoints are evenly
   spaced; ``step`` stays right when ``last.ckpt`` falls between periodic checkpoints.
4. The class, by the paper's rule (``rule=paper``, our reading of its Appendix B): with
   ΔL = fit(x_last) − fit(x_first), a token whose ΔL < −``trend`` is H→L (its loss fell), one with
   ΔL > ``trend`` is L→H (it rose); the others kept their level: H→H if their loss at the last
   checkpoint is above ``high_loss``, else L→L. ``high_loss`` null is the paper's threshold: the
   mean loss of all the held-out tokens at the last checkpoint. ``rule=levels`` instead calls the
   start and the end H or L separately, each by its fitted value against ``high_loss``.

The paper found, for TinyLlama-1B continually pretrained on 15B OpenWebMath tokens, 11% H→H,
12% L→H, 26% H→L and 51% L→L; the command prints and writes ours beside them.

Outputs (one folder, written as one): dynamics.json (settings, checkpoints, class shares and mean
loss per checkpoint), classes.csv (the shares), tokens.csv (per token: its losses, fit and class),
dynamics.png (each class's mean loss across checkpoints) and dynamics.html (the figure, the shares
and example tokens of each class in context, drawn by slm_cli/report/tokens.py).
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from slm_cli.errors import SlmError
from slm_cli.outputs import RUN_DIR_CHECKPOINT, atomic_write, load_checkpoint, write_json
from slm_cli.report import html
from slm_cli.report.folder import staged_folder
from slm_cli.report.tokens import STYLE, Scale, fmt, legend_html, model_stats, token_pieces, tokens_html

CLASSES = ("H→H", "L→H", "H→L", "L→L")
# RHO-1, Fig. 2(a): TinyLlama-1B, 15B OpenWebMath tokens, a ~320k-token validation set.
PAPER_SHARES = {"H→H": 0.11, "L→H": 0.12, "H→L": 0.26, "L→L": 0.51}
COLORS = {"H→H": "#cf222e", "L→H": "#e16f24", "H→L": "#0969da", "L→L": "#6e7781"}
MEANING = {"H→H": "high loss throughout", "L→H": "loss rose", "H→L": "loss fell", "L→L": "low loss throughout"}
RULES = ("paper", "levels")
MARKER = "dynamics.json"  # staged_folder replaces an existing out= folder only if it holds one
_STEP = re.compile(r"^step(\d+)(\.ckpt)?$")


# ---- checkpoints and data ---------------------------------------------------------------------

def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, path) of a run's periodic checkpoints in step order, and last.ckpt if it is later."""
    folder = run / "checkpoints"
    found = sorted((int(m.group(1)), p) for p in folder.glob("step*") if (m := _STEP.match(p.name)))
    last = run / RUN_DIR_CHECKPOINT
    if last.exists():
        step = int(load_checkpoint(last, tensors=False).get("global_step", -1))
        if not found or step > found[-1][0]:
            found.append((step, last))
    if len(found) < 2:
        raise SlmError(f"{run} has {len(found)} checkpoint{'s' if len(found) != 1 else ''} under checkpoints/, but a "
                       "trend needs at least 2: train with trainer.checkpoint_every_n_steps below "
                       "trainer.max_steps (e.g. a tenth of it)")
    return found


def heldout(config: dict[str, Any], data_dir: str, spec: Path, split: str, n_tokens: int,
            block_size: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, int]:
    """The held-out windows (input_ids, labels: (W, T)), the stream (positions 0..W·T) and the
    number of tokens used (``n_tokens``, or fewer if the split is shorter)."""
    from slm_cli.data.prepare import prepare
    from slm_cli.data.windows import ValWindows

    data_cfg = OmegaConf.create(config["data"])
    prepared = prepare(data_cfg, OmegaConf.create({"data_dir": data_dir}), tokenizer_spec=str(spec))
    stream = prepared.tokens(split)
    windows = ValWindows(stream, block_size)
    available = len(windows) * block_size
    if available < n_tokens:
        print(f"dynamics: the {split} split of {prepared.dir} holds {available} tokens in windows of {block_size}; "
              f"using those (tokens={n_tokens} asked)")
        n_tokens = available
    count = -(-n_tokens // block_size)
    items = [windows[k] for k in range(count)]
    input_ids = torch.stack([item["input_ids"] for item in items])
    labels = torch.stack([item["labels"] for item in items])
    return input_ids, labels, np.asarray(stream[: count * block_size + 1]).astype(np.int64), n_tokens


def losses_at(path: Path, input_ids: torch.Tensor, labels: torch.Tensor, n_tokens: int,
              batch_size: int) -> np.ndarray:
    """(n_tokens,) float32 per-token loss of the checkpoint at ``path``."""
    from slm_cli.model.load import load_model

    model = load_model(load_checkpoint(path))
    out = [model_stats(model, input_ids[s: s + batch_size], labels[s: s + batch_size], entropy=False).loss
           for s in range(0, len(input_ids), batch_size)]
    return torch.cat(out)[:n_tokens].numpy().astype(np.float32)


# ---- the fit and the classes ------------------------------------------------------------------

def fit_lines(x: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(slope, intercept) per column of ``losses`` (K, N): the least-squares line through
    (x_k, losses[k, j]) in float64, in closed form (x centred: no cancellation for large steps)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    xc = x - x.mean()
    slope = xc @ (y - y.mean(axis=0)) / (xc @ xc)
    intercept = y.mean(axis=0) - slope * x.mean()
    return slope, intercept


@dataclass
class Classes:
    labels: np.ndarray  # (N,) int: an index into CLASSES
    start: np.ndarray  # (N,) the fitted loss at the first checkpoint
    end: np.ndarray  # (N,) ... at the last
    slope: np.ndarray  # (N,) per unit of x
    threshold: float  # the H/L level used (nats)


def classify(x: np.ndarray, losses: np.ndarray, rule: str = "paper", trend: float = 0.2,
             high_loss: float | None = None) -> Classes:
    """Each token's class from its losses (K checkpoints × N tokens) at x (see the module doc)."""
    slope, intercept = fit_lines(x, losses)
    start, end = slope * float(x[0]) + intercept, slope * float(x[-1]) + intercept
    last = np.asarray(losses[-1], dtype=np.float64)
    threshold = float(last.mean()) if high_loss is None else float(high_loss)
    if rule == "paper":
        delta = end - start
        labels = np.where(last > threshold, CLASSES.index("H→H"), CLASSES.index("L→L"))
        labels = np.where(delta > trend, CLASSES.index("L→H"), labels)
        labels = np.where(delta < -trend, CLASSES.index("H→L"), labels)
    elif rule == "levels":
        high_start, high_end = start > threshold, end > threshold
        names = {(True, True): "H→H", (False, True): "L→H", (True, False): "H→L", (False, False): "L→L"}
        labels = np.array([CLASSES.index(names[(bool(a), bool(b))]) for a, b in zip(high_start, high_end, strict=True)],
                          dtype=np.int64)
    else:
        raise SlmError(f"rule={rule} is not known: use one of {', '.join(RULES)}")
    return Classes(labels=labels.astype(np.int64), start=start, end=end, slope=slope, threshold=threshold)


# ---- outputs ----------------------------------------------------------------------------------

def _check(cfg: DictConfig) -> None:
    from slm_cli.config import is_int, is_number

    if cfg.run is None:
        raise SlmError("pass the run: slm dynamics run=<run dir with periodic checkpoints>")
    if not Path(str(cfg.run)).is_dir():
        raise SlmError(f"run={cfg.run} is not a folder: pass a run dir written by `slm train`")
    rules = [
        (cfg.split in ("val", "train"), "split", cfg.split, "val or train", "val"),
        (is_int(cfg.tokens) and cfg.tokens > 0, "tokens", cfg.tokens, "a positive number of tokens", "8192"),
        (cfg.x in ("step", "index"), "x", cfg.x, "step or index", "step"),
        (cfg.rule in RULES, "rule", cfg.rule, " or ".join(RULES), "paper"),
        (is_number(cfg.trend) and cfg.trend >= 0, "trend", cfg.trend, "a loss change >= 0 in nats", "0.2"),
        (cfg.high_loss is None or is_number(cfg.high_loss), "high_loss", cfg.high_loss, "a loss in nats or null",
         "null"),
        (is_int(cfg.examples) and cfg.examples >= 0, "examples", cfg.examples, "an integer >= 0", "6"),
        (is_int(cfg.context) and cfg.context >= 0, "context", cfg.context, "an integer >= 0", "12"),
        (is_int(cfg.batch_size) and cfg.batch_size > 0, "batch_size", cfg.batch_size, "a positive integer", "16"),
    ]
    for ok, key, value, rule, example in rules:
        if not ok:
            raise SlmError(f"{key}={value} must be {rule}: e.g. {key}={example}")


def shares(classes: Classes) -> dict[str, dict[str, Any]]:
    n = len(classes.labels)
    counts = np.bincount(classes.labels, minlength=len(CLASSES))
    return {c: {"tokens": int(counts[i]), "share": float(counts[i] / n), "paper_share": PAPER_SHARES[c]}
            for i, c in enumerate(CLASSES)}


def class_means(losses: np.ndarray, labels: np.ndarray) -> dict[str, list[float] | None]:
    """Each class's mean loss at each checkpoint (None for an empty class)."""
    return {c: (losses[:, labels == i].astype(np.float64).mean(axis=1).tolist() if (labels == i).any() else None)
            for i, c in enumerate(CLASSES)}


def plot(steps: list[int], means: dict[str, list[float] | None], table: dict[str, dict[str, Any]],
         x: np.ndarray, path: Path) -> Path:
    """Left: each class's mean loss across checkpoints, with its least-squares line (the mean of
    its tokens' lines). Right: the class shares beside the paper's."""
    from slm_cli.report.plots import pyplot

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


def _csv(header: list[str], rows: list[list[Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode()


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


def dynamics(cfg: DictConfig) -> Path:
    """`slm dynamics`: evaluate, fit, classify and write the folder; returns it."""
    from tokenizers import Tokenizer

    from slm_cli.report.plots import pyplot

    _check(cfg)
    pyplot()  # without matplotlib: one line naming the extra, before any work
    run = Path(str(cfg.run))
    found = checkpoints(run)
    steps = [s for s, _ in found]
    last = found[-1][1]
    ckpt = load_checkpoint(last, tensors=False)
    config = ckpt["slm"].get("config")  # the run's resolved config
    if not config or "data" not in config:
        raise SlmError(f"checkpoint {last} holds no run config: pass a run dir written by `slm train`")
    block_size = int(ckpt["slm"]["model"]["block_size"])
    data_dir = str(cfg.data_dir) if cfg.data_dir is not None else str(config.get("paths", {}).get("data_dir", "data"))
    input_ids, labels, stream, n = heldout(config, data_dir, last, cfg.split, int(cfg.tokens), block_size)
    losses = np.stack([losses_at(path, input_ids, labels, n, int(cfg.batch_size)) for _, path in found])
    x = np.asarray(steps if cfg.x == "step" else range(len(steps)), dtype=np.float64)
    classes = classify(x, losses, cfg.rule, float(cfg.trend), None if cfg.high_loss is None else float(cfg.high_loss))
    table = shares(classes)
    means = class_means(losses, classes.labels)
    tokenizer = Tokenizer.from_str(ckpt["slm"]["tokenizer_json"])
    out = Path(str(cfg.out)) if cfg.out else run / "dynamics"
    summary = {
        "run": str(run), "split": cfg.split, "tokens": n, "block_size": block_size,
        "checkpoints": [{"step": s, "path": str(p), "mean_loss": float(losses[k].astype(np.float64).mean())}
                        for k, (s, p) in enumerate(found)],
        "x": cfg.x, "rule": cfg.rule, "trend": float(cfg.trend), "high_loss": classes.threshold,
        "high_loss_from": "mean loss at the last checkpoint" if cfg.high_loss is None else "high_loss",
        "classes": {c: {**table[c], "mean_loss": means[c]} for c in CLASSES},
        "paper": "RHO-1 (arXiv 2404.07965) Fig. 2: TinyLlama-1B, 15B OpenWebMath tokens",
    }
    header = ["position", "token_id", "class", "fit_start", "fit_end", "delta", "slope"] + [f"loss_step{s}" for s in steps]
    rows = [[k + 1, int(stream[k + 1]), CLASSES[classes.labels[k]], f"{classes.start[k]:.9g}", f"{classes.end[k]:.9g}",
             f"{classes.end[k] - classes.start[k]:.9g}", f"{classes.slope[k]:.9g}",
             *(f"{v:.9g}" for v in losses[:, k])] for k in range(n)]
    with staged_folder(out, MARKER) as stage:
        png = plot(steps, means, table, x, stage / "dynamics.png")
        atomic_write(stage / "classes.csv", lambda f: f.write(_csv(
            ["class", "tokens", "share", "paper_share"],
            [[c, table[c]["tokens"], f"{table[c]['share']:.6f}", table[c]["paper_share"]] for c in CLASSES])))
        atomic_write(stage / "tokens.csv", lambda f: f.write(_csv(header, rows)))
        page = _page(summary, png, classes, stream, losses, steps, tokenizer, int(cfg.examples), int(cfg.context))
        atomic_write(stage / "dynamics.html", lambda f: f.write(page.encode()))
        write_json(stage / MARKER, summary)  # last: the folder's marker
    _print(summary, out)
    return out


def _rule_text(summary: dict[str, Any]) -> str:
    level = f"{summary['high_loss']:.3f} nats ({summary['high_loss_from']})"
    if summary["rule"] == "paper":
        return (f"rule paper: ΔL (least-squares line vs {summary['x']}, last minus first checkpoint) < −{summary['trend']:g}: "
                f"H→L, > {summary['trend']:g}: L→H; otherwise H→H if the last loss > {level}, else L→L")
    return f"rule levels: fitted loss at the first and at the last checkpoint, each H if > {level}"


def _page(summary: dict[str, Any], png: Path, classes: Classes, stream: np.ndarray, losses: np.ndarray,
          steps: list[int], tokenizer: Any, examples: int, context: int) -> str:
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


def _print(summary: dict[str, Any], out: Path) -> None:
    steps = [c["step"] for c in summary["checkpoints"]]
    print(f"dynamics: {summary['tokens']} {summary['split']} tokens at {len(steps)} checkpoints (steps "
          f"{', '.join(map(str, steps))})")
    print(f"  {_rule_text(summary)}")
    print(f"  {'class':<6}{'tokens':>8}{'share':>9}{'RHO-1 paper':>13}   mean loss first → last")
    for c, v in summary["classes"].items():
        trend = "" if v["mean_loss"] is None else f"{v['mean_loss'][0]:.3f} → {v['mean_loss'][-1]:.3f}"
        print(f"  {c:<6}{v['tokens']:>8}{100 * v['share']:>8.1f}%{100 * v['paper_share']:>12.0f}%   {trend}")
    print(f"  -> {out}")

