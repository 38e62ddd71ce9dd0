"""`slm report`: the runs of a sweep (or any run dirs) compared in one folder: report.md,
report.csv, report.html and the PNG plots (docs/report.md)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from slm_cli.errors import SlmError
from slm_cli.report import html, matched
from slm_cli.report.folder import staged_folder
from slm_cli.report.plot_style import pyplot
from slm_cli.report.plots import draw_all
from slm_cli.report.runs import FINISHED, Run, find_runs, latest
from slm_cli.report.table import (
    Table,
    build_table,
    csv_text,
    format_value,
    markdown_table,
    results_rows,
    runs_rows,
)

MARKER = "report.md"  # every report folder holds one: staged_folder replaces only such folders
# Shared settings named in the report's "held fixed" line, when every run has the same value.
FIXED_SHOWN = ["selection.name", "selection.ratio", "selection.alpha", "target.name", "model.name", "data.name",
               "trainer.max_steps", "data.batch_size", "model.block_size", "trainer.accumulate_grad_batches",
               "trainer.devices", "trainer.num_nodes", "optim.lr"]
FLOPS_NOTE = ("FLOPs: realised is what the code executed, nominal the papers' accounting (the backward pass "
              "of the selected tokens only; docs/flops.md); saved = 1 − FLOPs / FLOPs of CLM steps on the same "
              "tokens.")


def report(cfg: DictConfig) -> Path:
    pyplot()  # without matplotlib: one line naming the extra, before any work
    named = [str(p) for p in (cfg.runs or [])]
    if not named:
        roots = [Path(cfg.paths.log_dir), Path(cfg.paths.root_dir) / "multirun"]
        found = latest(roots)
        if found is None:
            raise SlmError(f"no runs under {' or '.join(str(r) for r in roots)}: train first, or pass run dirs: "
                           "slm report <run or sweep dir>...")
        named = [str(found)]
    runs = find_runs(named)
    out = Path(cfg.out) if cfg.out else default_out(named, Path(cfg.paths.log_dir))
    written = write(runs, out)
    header, rows = results_rows(written.table, _namer(_common_dir(runs)))
    print(markdown_table(header[:-1], [r[:-1] for r in rows]))  # the console table, without run names
    print(f"report: {out / 'report.html'} ({len(runs)} runs, {len(written.table.rows)} configurations; "
          f"{out / MARKER}, report.csv, {len(written.figures)} plots)")
    return out


@dataclass
class Report:
    """A report written: its results table, its comparisons against CLM and its figures (files in
    ``out``, with their captions), for a page that builds on it (slm_cli/report/results.py)."""

    out: Path
    table: Table
    comparisons: list[matched.Comparison]
    figures: list[tuple[Path, str]]


def write(runs: Sequence[Run], out: Path) -> Report:
    """The report of ``runs`` written into the folder ``out``, as one."""
    table = build_table(runs)
    base = _common_dir(runs)
    comparisons = matched.compare(table)
    try:
        with staged_folder(out, MARKER) as stage:
            figures = draw_all(table, stage)
            # plain writes: the staging folder is renamed into place as a whole (folder.py)
            (stage / "report.csv").write_text(csv_text(table))
            if comparisons:
                (stage / "against_clm.csv").write_text(matched.csv_text(table, comparisons))
            (stage / "report.html").write_text(html_page(table, runs, base, figures, comparisons))
            (stage / MARKER).write_text(markdown(table, runs, base, figures, comparisons))
    except PermissionError as exc:
        raise SlmError(f"cannot write the report to {out} ({exc.strerror}): pass out=<a folder you can write>") from None
    return Report(out, table, comparisons, [(out / path.name, caption) for path, caption in figures])


def default_out(named: Sequence[str], log_dir: Path) -> Path:
    """<dir>/report/ when one run or sweep dir is named; else <log_dir>/report/<date>_<time>/ (the
    layout of every other command's outputs)."""
    if len(named) == 1 and not _is_glob(named[0]) and Path(named[0]).is_dir():
        return Path(named[0]) / "report"
    return log_dir / "report" / time.strftime("%Y-%m-%d_%H-%M-%S")


def _is_glob(text: str) -> bool:
    import glob

    return glob.has_magic(text)


def _common_dir(runs: Sequence[Run]) -> Path:
    if len(runs) == 1:
        return runs[0].dir.parent
    return Path(os.path.commonpath([str(r.dir) for r in runs]))


def _namer(base: Path) -> Any:
    """A run's name in the tables: its path below the folder all runs share."""
    def name(run: Run) -> str:
        return os.path.relpath(run.dir, base)
    return name


def _intro(table: Table, runs: Sequence[Run], base: Path) -> tuple[str, str]:
    finished = sum(r.status == FINISHED for r in runs)
    counts = ", ".join(f"{n} {status}" for status in ("finished", "unfinished", "failed")
                       if (n := sum(r.status == status for r in runs)))
    line = (f"{len(runs)} runs in {base} ({counts}), {len(table.rows)} configurations; "
            f"written {time.strftime('%Y-%m-%d %H:%M')} by `slm report`.")
    if not finished:
        line += " No run has finished yet: the tables have no figures; the plots show what is logged so far."
    fixed = [f"{k} {format_value(table.fixed[k])}" for k in FIXED_SHOWN if k in table.fixed]
    return line, ("Held fixed: " + ", ".join(fixed) + ".") if fixed else ""


def _aligns(header: Sequence[str], first_numeric: int) -> str:
    return "".join("r" if first_numeric <= i < len(header) - 1 else "l" for i in range(len(header)))


AGAINST_CLM = ("Each configuration beside CLM runs of the same setting: at the same steps, at the same "
               "realised FLOPs and at the same nominal FLOPs, the papers' accounting (CLM given fewer steps). "
               "against_clm.csv has the figures at full precision.")


def markdown(table: Table, runs: Sequence[Run], base: Path, figures: Sequence[tuple[Path, str]],
             comparisons: Sequence[matched.Comparison] = ()) -> str:
    name = _namer(base)
    line, fixed = _intro(table, runs, base)
    header, rows = results_rows(table, name)
    run_header, run_rows = runs_rows(table, name)
    parts = ["# slm report", "", line, ""]
    if fixed:
        parts += [fixed, ""]
    parts += ["## Results", "",
              "One row per configuration: mean ± sample standard deviation over its finished runs "
              "(n of them; seeds differ). report.csv has every figure at full precision.", "",
              markdown_table(header, rows, _aligns(header, len(table.columns))), "", FLOPS_NOTE, ""]
    if comparisons:
        parts += ["## Against CLM", "", AGAINST_CLM, "",
                  markdown_table(matched.HEADER, matched.rows_text(table, comparisons), "l" + "r" * 9), "",
                  matched.NOTE, ""]
    parts += ["## Runs", "", markdown_table(run_header, run_rows, "llllrrl"), ""]
    if figures:
        parts += ["## Plots", ""]
        for path, caption in figures:
            parts += [f"![{path.stem.replace('_', ' ')}]({path.name})", "", f"*{caption}*", ""]
    return "\n".join(parts)


def html_page(table: Table, runs: Sequence[Run], base: Path, figures: Sequence[tuple[Path, str]],
              comparisons: Sequence[matched.Comparison] = ()) -> str:
    name = _namer(base)
    line, fixed = _intro(table, runs, base)
    header, rows = results_rows(table, name)
    run_header, run_rows = runs_rows(table, name)
    body = [html.paragraph(line.replace("`", ""), "meta")]
    if fixed:
        body.append(html.paragraph(fixed, "meta"))
    body += [html.heading("Results"),
             html.paragraph("One row per configuration: mean ± sample standard deviation over its finished "
                            "runs (n of them; seeds differ). report.csv has every figure at full precision."),
             html.table(header, rows, _aligns(header, len(table.columns))),
             html.paragraph(FLOPS_NOTE)]
    if comparisons:
        body += [html.heading("Against CLM"), html.paragraph(AGAINST_CLM),
                 html.table(matched.HEADER, matched.rows_text(table, comparisons), "l" + "r" * 9),
                 html.paragraph(matched.NOTE)]
    if figures:
        body.append(html.heading("Plots"))
        body += [html.figure(path, caption) for path, caption in figures]
    body += [html.heading("Runs"), html.table(run_header, run_rows, "llllrrl", classes={1: "status-", 6: "wrap"})]
    return html.page("slm report", body)
