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
    downstream_rows,
    format_value,
    markdown_table,
    method_name,
    results_rows,
    runs_rows,
)

MARKER = "report.md"  # every report folder holds one: staged_folder replaces only such folders
# Shared settings named in the report's "held fixed" line, when every run has the same value (the
# method, by its name, when every run has the same).
FIXED_SHOWN = ["model.name", "data.name", "trainer.max_steps", "data.batch_size", "model.block_size",
               "trainer.accumulate_grad_batches", "trainer.devices", "trainer.num_nodes", "optim.lr"]
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
    return line, held_fixed(table, runs)


def held_fixed(table: Table, runs: Sequence[Run]) -> str:
    """The "held fixed" line: the method every run shares (by its name) and the FIXED_SHOWN
    settings every run shares; an empty or null setting (data=text's data.name) is not a setting."""
    fixed = [f"{k} {format_value(table.fixed[k])}" for k in FIXED_SHOWN
             if k in table.fixed and table.fixed[k] not in (None, "", [], {})]
    methods = {method_name(run.config).name for run in runs}
    if len(methods) == 1 and runs:
        fixed.insert(0, f"method {methods.pop()}")
    return ("Held fixed: " + ", ".join(fixed) + ".") if fixed else ""


def _aligns(header: Sequence[str], first_numeric: int) -> str:
    return "".join("r" if first_numeric <= i < len(header) - 1 else "l" for i in range(len(header)))


DOWNSTREAM = ("Accuracy of each configuration's final model per task (lm-eval's acc), from `slm eval "
              "ckpt_path=<run> tasks=...` (its results in <run>/eval/): mean ± sample standard deviation over "
              "the runs evaluated, n of them.")
DOWNSTREAM_AGAINST = ("Δ accuracy against CLM after the same steps, ± its standard error; \"better\"/\"worse\" "
                      "only beyond twice that (higher accuracy is better).")


def sections(table: Table, comparisons: Sequence[matched.Comparison]) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """The report's tables after the results table, each (heading, note, header, rows), for
    report.md and report.html alike: against CLM, by training length, downstream accuracy and
    its difference from CLM's; only those with rows."""
    out = []
    if comparisons:
        out.append(("Against CLM", AGAINST_CLM + " " + matched.NOTE, matched.HEADER,
                    matched.rows_text(table, comparisons)))
        header, rows = matched.length_text(matched.by_length(table, comparisons))
        if rows:
            out.append(("Against CLM by training length", matched.LENGTH_NOTE, header, rows))
    header, rows = downstream_rows(table)
    if rows:
        out.append(("Downstream accuracy", DOWNSTREAM, header, rows))
        header, rows = matched.downstream_text(table, comparisons)
        if rows:
            out.append(("Downstream accuracy against CLM", DOWNSTREAM_AGAINST, header, rows))
    return out


AGAINST_CLM = ("Each configuration beside CLM runs of the same setting: at the same steps, at the same "
               "realised FLOPs and at the same nominal FLOPs, the papers' accounting (CLM given fewer steps). "
               "against_clm.csv has the figures at full precision.")


def _page_parts(table: Table, runs: Sequence[Run], base: Path) -> tuple[str, str, tuple[list[str], list[list[str]]],
                                                                   tuple[list[str], list[list[str]]]]:
    """What report.md and report.html both show: the intro line, the fixed settings, the results
    table and the runs table (header and rows each), configurations named the same way."""
    name = _namer(base)
    line, fixed = _intro(table, runs, base)
    return line, fixed, results_rows(table, name), runs_rows(table, name)


def markdown(table: Table, runs: Sequence[Run], base: Path, figures: Sequence[tuple[Path, str]],
             comparisons: Sequence[matched.Comparison] = ()) -> str:
    line, fixed, (header, rows), (run_header, run_rows) = _page_parts(table, runs, base)
    parts = ["# slm report", "", line, ""]
    if fixed:
        parts += [fixed, ""]
    parts += ["## Results", "",
              "One row per configuration: mean ± sample standard deviation over its finished runs "
              "(n of them; seeds differ). report.csv has every figure at full precision.", "",
              markdown_table(header, rows, _aligns(header, len(table.columns) + 1)), "", FLOPS_NOTE, ""]
    for heading, note, sub_header, sub_rows in sections(table, comparisons):
        parts += [f"## {heading}", "", note, "", markdown_table(sub_header, sub_rows, "l" + "r" * len(sub_header)), ""]
    parts += ["## Runs", "", markdown_table(run_header, run_rows, "llllrrl"), ""]
    if figures:
        parts += ["## Plots", ""]
        for path, caption in figures:
            parts += [f"![{path.stem.replace('_', ' ')}]({path.name})", "", f"*{caption}*", ""]
    return "\n".join(parts)


def html_page(table: Table, runs: Sequence[Run], base: Path, figures: Sequence[tuple[Path, str]],
              comparisons: Sequence[matched.Comparison] = ()) -> str:
    line, fixed, (header, rows), (run_header, run_rows) = _page_parts(table, runs, base)
    body = [html.paragraph(line.replace("`", ""), "meta")]
    if fixed:
        body.append(html.paragraph(fixed, "meta"))
    body += [html.heading("Results"),
             html.paragraph("One row per configuration: mean ± sample standard deviation over its finished "
                            "runs (n of them; seeds differ). report.csv has every figure at full precision."),
             html.table(header, rows, _aligns(header, len(table.columns) + 1)),
             html.paragraph(FLOPS_NOTE)]
    for heading, note, sub_header, sub_rows in sections(table, comparisons):
        body += [html.heading(heading), html.paragraph(note.replace("`", "")),
                 html.table(sub_header, sub_rows, "l" + "r" * len(sub_header))]
    if figures:
        body.append(html.heading("Plots"))
        body += [html.figure(path, caption) for path, caption in figures]
    body += [html.heading("Runs"), html.table(run_header, run_rows, "llllrrl", classes={1: "status-", 6: "wrap"})]
    return html.page("slm report", body)
