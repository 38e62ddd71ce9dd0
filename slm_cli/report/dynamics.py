"""`slm dynamics run=<run dir>`: how each token's loss moves during a run, classified as in RHO-1
(Lin et al. 2024, arXiv 2404.07965, Fig. 2 and Appendix B), docs/report.md#slm-dynamics.

1. A fixed held-out token set: the first ``tokens`` predicted tokens of the run's val split
   (stream positions 1..N), in the non-overlapping windows of the model's context that `slm eval`
   uses, so every token is scored from the same context at every checkpoint.
2. Its per-token loss (slm_cli/loss.py's ``model_token_stats``) at every checkpoint of the run:
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
and example tokens of each class in context, drawn by slm_cli/report/token_page.py).

The fit and the classes are slm_cli/report/dynamics_classes.py's; the figure, the page and the
printed summary slm_cli/report/dynamics_page.py's.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from slm_cli.errors import SlmError
from slm_cli.loss import model_token_stats
from slm_cli.outputs import RUN_DIR_CHECKPOINT, atomic_write, load_checkpoint, write_json
from slm_cli.report.dynamics_classes import CLASSES, RULES, class_means, classify, shares
from slm_cli.report.dynamics_page import plot, print_summary, render_page
from slm_cli.report.folder import staged_folder
from slm_cli.run_settings import describe_data, run_config

MARKER = "dynamics.json"  # staged_folder replaces an existing out= folder only if it holds one
_STEP = re.compile(r"^step(\d+)(\.ckpt)?$")


# ---- checkpoints and data ---------------------------------------------------------------------

def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, path) of a run's periodic checkpoints in step order, and last.ckpt if it is later."""
    folder = run / "checkpoints"
    found = sorted((int(m.group(1)), p) for p in folder.glob("step*") if (m := _STEP.match(p.name)))
    last = run / RUN_DIR_CHECKPOINT
    if last.exists():
        step = int(load_checkpoint(last, tensors=False, key="run").get("global_step", -1))
        if not found or step > found[-1][0]:
            found.append((step, last))
    if len(found) < 2:
        raise SlmError(f"run={run} has {len(found)} checkpoint{'s' if len(found) != 1 else ''} under checkpoints/, "
                       "but a trend needs at least 2: train with trainer.checkpoint_every_n_steps below "
                       "trainer.max_steps (e.g. a tenth of it)")
    return found


def heldout(settings: DictConfig, spec: Path, split: str, n_tokens: int,
            block_size: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, int]:
    """The held-out windows (input_ids, labels: (W, T)), the stream (positions 0..W·T) and the
    number of tokens used (``n_tokens``, or fewer if the split is shorter). ``settings`` holds the
    run's ``data`` and ``paths``."""
    from slm_cli.data.prepare import prepare
    from slm_cli.data.windows import ValWindows

    prepared = prepare(settings.data, settings.paths, tokenizer_spec=str(spec))
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
    from slm_cli.model.load import load_slm

    model, _ = load_slm(path, key="run")
    out = [model_token_stats(model, input_ids[s: s + batch_size], labels[s: s + batch_size]).loss
           for s in range(0, len(input_ids), batch_size)]
    return torch.cat(out)[:n_tokens].numpy().astype(np.float32)


# ---- the command ------------------------------------------------------------------------------

def run_settings(run: Path, entry: dict[str, Any], data_dir: str | None) -> DictConfig:
    """The run's ``data`` and ``paths`` (its config: slm_cli/run_settings.py), with ``data_dir`` if given."""
    config = run_config(run, entry)
    if "data" not in config:
        raise SlmError(f"run={run} holds no training config (neither its checkpoint nor .hydra/config.yaml): pass "
                       "run=<a run dir written by `slm train`>")
    paths = {"data_dir": str(data_dir) if data_dir is not None else str(config.get("paths", {}).get("data_dir", "data"))}
    return OmegaConf.create({"data": config["data"], "paths": paths})


def _check(cfg: DictConfig) -> None:
    from slm_cli.config import is_int, is_number

    if cfg.run is None:
        raise SlmError("pass the run: slm dynamics run=<run dir with periodic checkpoints>")
    if not Path(str(cfg.run)).is_dir():
        raise SlmError(f"run={cfg.run} is not a folder: pass run=<a run dir written by `slm train`>")
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


def _csv(header: list[str], rows: list[list[Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode()


def dynamics(cfg: DictConfig) -> Path:
    """`slm dynamics`: evaluate, fit, classify and write the folder; returns it."""
    from tokenizers import Tokenizer

    from slm_cli.report.plot_style import pyplot

    _check(cfg)
    pyplot()  # without matplotlib: one line naming the extra, before any work
    run = Path(str(cfg.run))
    found = checkpoints(run)
    steps = [s for s, _ in found]
    last = found[-1][1]
    ckpt = load_checkpoint(last, tensors=False, key="run")
    settings = run_settings(run, ckpt["slm"], cfg.data_dir)
    print(f"dynamics: {run}'s data ({describe_data(settings)}), split {cfg.split}")
    block_size = int(ckpt["slm"]["model"]["block_size"])
    input_ids, labels, stream, n = heldout(settings, last, cfg.split, int(cfg.tokens), block_size)
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
        page = render_page(summary, png, classes, stream, losses, steps, tokenizer, int(cfg.examples), int(cfg.context))
        atomic_write(stage / "dynamics.html", lambda f: f.write(page.encode()))
        write_json(stage / MARKER, summary)  # last: the folder's marker
    print_summary(summary, out)
    return out
