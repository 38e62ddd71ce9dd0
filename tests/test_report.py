"""`slm report`: a real sweep (2 strategies × 2 seeds) reported through the CLI, its aggregates
checked against the runs' own summary.json files, unfinished and failed runs, bad input, the
plots and the self-contained HTML page."""

from __future__ import annotations

import base64
import csv
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from slm_cli.report.runs import Run
from tests.helpers import QUIET, TINY_DATA, TINY_MODEL, earlier_summary, ok, slm

PNGS = ["val_loss_vs_flops.png", "loss_vs_tokens.png", "loss_vs_flops.png", "val_loss_vs_seconds.png", "selection.png"]
TOKENS_PER_STEP = 4 * 32  # data.batch_size=4 windows of model.block_size=32 (TINY_DATA, TINY_MODEL)


@pytest.fixture(scope="module")
def sweep(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One `slm train -m` call: selection=clm,eslm × seed=1,2, validating every 4 of 8 steps."""
    root = tmp_path_factory.mktemp("report")
    sweep = root / "sweep"
    ok(slm("train", "-m", "selection=clm,eslm", "seed=1,2", f"hydra.sweep.dir={sweep}", f"paths.data_dir={tiny_data}",
           *TINY_DATA, *TINY_MODEL, *QUIET, "trainer.max_steps=8", "trainer.val_check_interval=4",
           "trainer.log_every_n_steps=1", cwd=root))
    assert len(list(sweep.glob("*/summary.json"))) == 4
    return sweep


@pytest.fixture(scope="module")
def reported(sweep: Path) -> Path:
    """`slm report <sweep>` with a bare path; the report goes to <sweep>/report/."""
    proc = ok(slm("report", str(sweep), cwd=sweep.parent))
    assert "report.html" in proc.stdout
    return sweep / "report"


def runs_of(sweep: Path) -> list[tuple[dict, dict, Path]]:
    """(config, summary, run dir) of each run, read directly from the files."""
    return [(yaml.safe_load((d / ".hydra" / "config.yaml").read_text()), json.loads((d / "summary.json").read_text()), d)
            for d in sorted(p.parent for p in sweep.glob("*/summary.json"))]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---- the aggregates --------------------------------------------------------------------------

def test_aggregates_are_mean_and_std_over_seeds_of_the_summaries(sweep: Path, reported: Path) -> None:
    rows = {r["selection.name"]: r for r in read_csv(reported / "report.csv")}
    assert sorted(rows) == ["clm", "eslm"]
    figures = {  # report.csv column -> the value from one summary.json
        "val_loss": lambda s: s["val_loss"], "val_ppl": lambda s: s["val_ppl"], "steps": lambda s: s["steps"],
        "tokens": lambda s: s["train_tokens"], "selected_frac": lambda s: s["selected_tokens"] / s["train_tokens"],
        "flops_nominal": lambda s: s["flops_nominal"], "flops_realized": lambda s: s["flops_realized"],
        "flops_clm": lambda s: s["flops_clm"],
        "flops_saved_frac_nominal": lambda s: s["flops_saved_frac_nominal"],
        "flops_saved_frac_realized": lambda s: s["flops_saved_frac_realized"],
        "tokens_per_s": lambda s: s["train_tokens_per_s"], "wall_s": lambda s: s["wall_s"],
    }
    for name in ("clm", "eslm"):
        mine = [(c, s, d) for c, s, d in runs_of(sweep) if c["selection"]["name"] == name]
        row = rows[name]
        assert row["n"] == "2" and row["unfinished"] == "0" and sorted(row["seeds"].split()) == ["1", "2"]
        assert sorted(row["runs"].split(";")) == sorted(str(d.resolve()) for _, _, d in mine)
        for column, get in figures.items():
            values = np.array([get(s) for _, s, _ in mine], dtype=np.float64)
            assert float(row[f"{column}_mean"]) == pytest.approx(values.mean(), rel=1e-12, abs=1e-15), column
            assert float(row[f"{column}_std"]) == pytest.approx(values.std(ddof=1), rel=1e-9, abs=1e-12), column
    # the strategies differ where they should (so the comparisons above are not all of zeros)
    assert float(rows["eslm"]["selected_frac_mean"]) < 1.0 == float(rows["clm"]["selected_frac_mean"])
    assert float(rows["eslm"]["flops_nominal_mean"]) < float(rows["clm"]["flops_nominal_mean"])
    assert float(rows["clm"]["val_loss_std"]) > 0


def test_config_columns_are_the_keys_that_differ(sweep: Path, reported: Path) -> None:
    """Every key whose value differs between the runs, except the seed and what follows from the
    strategy's name (its _target_ and ESLM's score); the budget (alpha) stays."""
    flats = [flatten(c) for c, _, _ in runs_of(sweep)]
    keys = set().union(*flats)
    differing = {k for k in keys if len({repr(f.get(k)) for f in flats}) > 1}
    assert {"seed", "selection._target_", "selection.score"} <= differing
    header = (reported / "report.csv").read_text().splitlines()[0].split(",")
    columns = header[: header.index("n")]
    assert columns == ["selection.name", "selection.alpha"] and set(columns) <= differing
    for key in differing - set(columns) - {"seed"}:  # left out: one value per strategy
        values: dict[str, set] = {}
        for f in flats:
            values.setdefault(f["selection.name"], set()).add(repr(f.get(key)))
        assert all(len(v) == 1 for v in values.values()), key
    rows = {r["selection.name"]: r for r in read_csv(reported / "report.csv")}
    assert rows["eslm"]["selection.alpha"] == "0.4" and rows["clm"]["selection.alpha"] == ""


def test_config_columns_unit() -> None:
    from slm_cli.report.runs import FINISHED
    from slm_cli.report.table import config_columns

    def run(**config: dict) -> Run:
        return Run(dir=Path("/x"), config=config, summary={}, status=FINISHED)

    nano = {"name": "gpt2-nano", "n_layer": 4}
    micro = {"name": "gpt2-micro", "n_layer": 6}
    # model size: the name says it; lr: a swept key of its own; progress bar: not a configuration
    runs = [run(model=m, optim={"lr": lr}, seed=s, trainer={"enable_progress_bar": s == 1})
            for m in (nano, micro) for lr in (1e-3, 3e-4) for s in (1, 2)]
    assert config_columns(runs)[0] == ["model.name", "optim.lr"]
    # a strategy's own key varied within that strategy is kept
    runs = [run(selection={"name": "clm"}), run(selection={"name": "eslm", "score": "loss", "alpha": 0.4}),
            run(selection={"name": "eslm", "score": "entropy", "alpha": 0.4})]
    assert config_columns(runs)[0] == ["selection.name", "selection.score", "selection.alpha"]
    # nothing differs but the seed: no config columns, one row
    assert config_columns([run(seed=1, selection={"name": "clm"}), run(seed=2, selection={"name": "clm"})])[0] == []


def conf(group: str, name: str, **overrides: object) -> dict:
    """A config group as a run dir holds it: the package's conf/<group>/<name>.yaml, then overrides."""
    return {**yaml.safe_load((Path(__file__).resolve().parents[1] / "conf" / group / f"{name}.yaml").read_text()),
            **overrides}


def test_method_names_read_as_a_reader_says_them() -> None:
    from slm_cli.report.table import keep_fraction, method_name, window_keep

    onehot, kd, coconts = conf("target", "onehot"), conf("target", "kd", teacher="/t"), conf("target", "coconts")
    cases = [
        ({"selection": conf("selection", "clm"), "target": onehot}, "CLM"),
        ({"selection": conf("selection", "random"), "target": onehot}, "Random (keep 0.6)"),
        ({"selection": conf("selection", "eslm"), "target": onehot}, "ESLM (loss, keep 0.6)"),
        ({"selection": conf("selection", "eslm", score="entropy", alpha=0.8), "target": onehot},
         "ESLM (entropy, keep 0.2)"),
        ({"selection": conf("selection", "ada_eslm"), "target": onehot}, "Ada-ESLM (loss)"),
        ({"selection": conf("selection", "hier_eslm"), "target": onehot},
         "Hierarchical ESLM (loss, windows 0.5, keep 0.6)"),
        ({"selection": conf("selection", "rho1"), "target": onehot}, "RHO-1 (excess, keep 0.6)"),
        ({"selection": conf("selection", "clm"), "target": coconts}, "CoCoNTs"),
        ({"selection": conf("selection", "eslm"), "target": kd}, "ESLM-KD (loss, keep 0.6)"),
        ({"selection": conf("selection", "random"), "target": kd}, "Random + KD (keep 0.6)"),
        ({"selection": conf("selection", "eslm"), "target": onehot, "trainer": {"selection_start_step": 100}},
         "ESLM (loss, keep 0.6) warm start 100"),
        ({"selection": conf("selection", "clm"), "target": onehot, "trainer": {"selection_start_step": 100}}, "CLM"),
        ({"selection": conf("selection", "clm"), "target": onehot, "data": {"window_grid": 128},
          "model": {"block_size": 128}}, "CLM on RHO-1's grid"),
        ({"selection": conf("selection", "random"), "target": onehot, "data": {"window_grid": 64},
          "model": {"block_size": 128}}, "Random (keep 0.6) on a 64-token grid"),
        ({"selection": conf("selection", "rho1"), "target": onehot, "data": {"window_grid": 128},
          "model": {"block_size": 128}}, "RHO-1 (excess, keep 0.6)"),  # RHO-1 always trains on its grid
        ({"selection": {"name": "mine", "ratio": 0.5}, "target": onehot}, "mine"),
    ]
    for config, name in cases:
        assert method_name(config).name == name, config
        assert method_name(flatten(config)).name == name  # a flat config names the same
    assert method_name(cases[2][0]).series == "ESLM (loss)" and method_name(cases[0][0]).series == "CLM"
    # the one keep fraction, for every strategy (Hierarchical ESLM: of the windows it keeps)
    assert keep_fraction(conf("selection", "hier_eslm", alpha=0.3)) == 0.7
    assert window_keep(conf("selection", "hier_eslm", window_alpha=0.75)) == 0.25
    assert window_keep(conf("selection", "eslm")) is None and keep_fraction(conf("selection", "ada_eslm")) is None


def run_with(**config: dict) -> Run:
    from slm_cli.report.runs import FINISHED, Run

    return Run(dir=Path("/x"), config=config, summary=None, status=FINISHED)


def test_what_tells_configurations_apart() -> None:
    """Bookkeeping never does; a key only some runs have does; an empty setting is not held fixed."""
    from slm_cli.report.build import held_fixed
    from slm_cli.report.table import build_table, results_rows

    # ESLM ranked by entropy beside CLM, checkpointed at another cadence: the entropy is what differs
    clm = run_with(selection=conf("selection", "clm"), target=conf("target", "onehot"),
                   trainer={"checkpoint_every_n_steps": 100, "max_steps": 200, "log_every_n_steps": 10},
                   logger={"wandb": {"id": "abc"}}, task_name="train")
    entropy = run_with(selection=conf("selection", "eslm", score="entropy"), target=conf("target", "onehot"),
                       trainer={"checkpoint_every_n_steps": 20, "max_steps": 200, "log_every_n_steps": 5},
                       logger={"wandb": {"id": "def"}}, task_name="train-2")
    table = build_table([clm, entropy])
    assert table.columns == ["selection.name", "selection.score", "selection.alpha"]
    assert [table.label(row) for row in table.rows] == ["CLM", "ESLM (entropy, keep 0.6)"]
    header, rows = results_rows(table, lambda run: "r")
    assert header[:5] == ["method", "selection.name", "selection.score", "selection.alpha", "n"]
    assert rows[0][:4] == ["CLM", "clm", "—", "—"] and rows[1][:4] == ["ESLM (entropy, keep 0.6)", "eslm", "entropy", "0.4"]
    # ESLM by loss (its default) beside CLM: the name says it, no score column
    loss = run_with(selection=conf("selection", "eslm"), target=conf("target", "onehot"),
                    trainer={"checkpoint_every_n_steps": 100, "max_steps": 200})
    assert build_table([clm, loss]).columns == ["selection.name", "selection.alpha"]
    # a key an older run does not have at all counts (absent: "—"), and so names the warm start
    older = run_with(selection=conf("selection", "eslm"), trainer={"max_steps": 200})
    warm = run_with(selection=conf("selection", "eslm"), trainer={"max_steps": 200, "selection_start_step": 50})
    table = build_table([older, warm])
    assert table.columns == ["trainer.selection_start_step"]
    assert [table.label(row) for row in table.rows] == ["ESLM (loss, keep 0.6)", "ESLM (loss, keep 0.6) warm start 50"]
    assert [r[1] for r in results_rows(table, lambda run: "r")[1]] == ["—", "50"]
    # data=text: data.name is null, and the same method for every run is named, not its keys
    runs = [run_with(selection=conf("selection", "eslm"), data={"name": None, "path": "a.txt", "batch_size": 16},
                     model={"name": "gpt2-nano"}, seed=seed) for seed in (1, 2)]
    line = held_fixed(build_table(runs), runs)
    assert line == "Held fixed: method ESLM (loss, keep 0.6), model.name gpt2-nano, data.batch_size 16."
    # rows of one method are told apart by what differs among them, read as a reader would
    runs = [run_with(selection=conf("selection", "clm"), trainer={"max_steps": n}, optim={"lr": lr})
            for n in (100, 200) for lr in (1e-3, 1e-3)] + [run_with(selection=conf("selection", "random"),
                                                                     trainer={"max_steps": 200}, optim={"lr": 3e-4})]
    table = build_table(runs)
    assert [table.label(row) for row in table.rows] == ["CLM, 100 steps", "CLM, 200 steps", "Random (keep 0.6)"]


def test_older_summaries_are_read_under_their_earlier_names() -> None:
    """flops_total (realised), flops_clm_equivalent, flops_saved_frac (nominal): docs/outputs.md."""
    from slm_cli.report.runs import summary_figures
    from slm_cli.summary import RunSummary

    old = {"steps": 10, "train_tokens": 1000, "selected_tokens": 600, "val_loss": 2.0, "flops_total": 900.0,
           "flops_clm_equivalent": 1000.0, "flops_saved_frac": 0.25}
    f = summary_figures(RunSummary.from_dict(old))
    assert f["flops_realized"] == 900.0 and f["flops_clm"] == 1000.0
    assert f["flops_nominal"] == pytest.approx(750.0) and f["flops_saved_frac_nominal"] == 0.25
    assert f["flops_saved_frac_realized"] == pytest.approx(0.1) and f["selected_frac"] == 0.6
    assert f["val_ppl"] == pytest.approx(np.exp(2.0))
    new = RunSummary.from_dict({**old, "flops_nominal": 700.0, "flops_realized": 800.0, "flops_clm": 1000.0})
    assert summary_figures(new)["flops_nominal"] == 700.0 and summary_figures(new)["flops_realized"] == 800.0


def test_a_sweep_with_earlier_summary_keys_reports_the_same_figures(sweep: Path, reported: Path,
                                                                     tmp_path: Path) -> None:
    """The sweep's run dirs with their summary.json rewritten as the oldest runs wrote it
    (tests/helpers.py's earlier_summary): `slm report` gives the same report.csv figures."""
    from omegaconf import OmegaConf

    from slm_cli.report.build import report

    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns("report", "checkpoints"))
    for path in copy.glob("*/summary.json"):
        old = earlier_summary(json.loads(path.read_text()))
        assert "flops_total" in old and "flops_nominal" not in old
        path.write_text(json.dumps(old))
    report(OmegaConf.create({"runs": [str(copy)], "out": str(tmp_path / "out"), "paths": {"log_dir": str(tmp_path)}}))
    now = {r["selection.name"]: r for r in read_csv(reported / "report.csv")}
    then = {r["selection.name"]: r for r in read_csv(tmp_path / "out" / "report.csv")}
    assert sorted(then) == sorted(now) == ["clm", "eslm"]
    figures = [k for k in now["clm"] if k.endswith(("_mean", "_std"))]
    assert "flops_nominal_mean" in figures and "flops_saved_frac_realized_mean" in figures
    for name in now:
        for key in figures:
            a, b = now[name][key], then[name][key]
            assert (a == b == "") or float(b) == pytest.approx(float(a), rel=1e-9, abs=1e-12), (name, key)


def test_curves_are_the_seed_means_of_metrics_csv(sweep: Path) -> None:
    """Validation loss against tokens and nominal FLOPs, read back independently from metrics.csv."""
    from slm_cli.report.curves import row_curve
    from slm_cli.report.runs import find_runs

    runs = [r for r in find_runs([str(sweep)]) if r.config["selection"]["name"] == "eslm"]
    per_run = []
    for run in runs:
        rows = read_csv(run.dir / "metrics.csv")
        val = {int(r["step"]): float(r["val/loss"]) for r in rows if r["val/loss"]}
        flops = {int(r["step"]): float(r["flops/nominal"]) for r in rows if r["flops/nominal"]}
        per_run.append((val, flops))
    steps = sorted(per_run[0][0])
    assert steps == [3, 7]  # after 4 and 8 optimizer steps
    x, y, std = row_curve(runs, "val/loss", "tokens")
    assert x.tolist() == [(s + 1) * TOKENS_PER_STEP for s in steps]
    losses = np.array([[val[s] for s in steps] for val, _ in per_run])
    assert y == pytest.approx(losses.mean(axis=0)) and std == pytest.approx(losses.std(axis=0, ddof=1))
    x, _, _ = row_curve(runs, "val/loss", "flops/nominal")
    assert x == pytest.approx(np.mean([[flops[s] for s in steps] for _, flops in per_run], axis=0))


# ---- plots and HTML --------------------------------------------------------------------------

def test_plots_are_images_of_some_substance(reported: Path) -> None:
    import matplotlib.image

    for name in PNGS:
        path = reported / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000, name
        pixels = matplotlib.image.imread(path)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 500, name
        assert pixels[..., :3].std() > 0.05, name  # not a blank canvas
    assert sorted(p.name for p in reported.iterdir()) == sorted(
        [*PNGS, "against_clm.csv", "report.csv", "report.html", "report.md"])


def test_html_is_self_contained(reported: Path) -> None:
    page = (reported / "report.html").read_text()
    assert not re.search(r"https?:", page, re.IGNORECASE)
    assert page.count("<table>") == 3 and "<td>eslm</td>" in page and "<td>clm</td>" in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == len(PNGS) and all(s.startswith("data:image/png;base64,") for s in sources)
    embedded = sorted(base64.b64decode(s.split(",", 1)[1]) for s in sources)
    assert embedded == sorted((reported / name).read_bytes() for name in PNGS)
    assert not re.search(r"<(link|script|iframe)\b|@import|url\(", page)
    md = (reported / "report.md").read_text()
    assert "| selection.name | selection.alpha | n |" in md and all(f"]({name})" in md for name in PNGS)


# ---- unfinished and failed runs ---------------------------------------------------------------

def test_unfinished_run_is_listed_and_left_out_of_the_means(sweep: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns("checkpoints", "report"))
    gone = next(d for c, _, d in runs_of(copy) if c["selection"]["name"] == "eslm" and c["seed"] == 2)
    kept = next(s for c, s, _ in runs_of(copy) if c["selection"]["name"] == "eslm" and c["seed"] == 1)
    (gone / "summary.json").unlink()
    out = tmp_path / "out"
    ok(slm("report", f"runs=[{copy}]", f"out={out}", cwd=tmp_path))  # the runs= form
    rows = {r["selection.name"]: r for r in read_csv(out / "report.csv")}
    assert rows["eslm"]["n"] == "1" and rows["eslm"]["unfinished"] == "1" and rows["eslm"]["seeds"] == "1"
    assert float(rows["eslm"]["val_loss_mean"]) == kept["val_loss"] and rows["eslm"]["val_loss_std"] == ""
    assert rows["clm"]["n"] == "2" and rows["clm"]["unfinished"] == "0"
    md = (out / "report.md").read_text()
    line = next(line for line in md.splitlines() if line.startswith(f"| {gone.name} |"))
    assert "| unfinished | 2 |" in line and "no summary.json" in line and "logged step 8 of 8" in line


def test_a_failed_slurm_job_is_listed_as_failed(sweep: Path, tmp_path: Path) -> None:
    """submitit wrote the job's result (it ended) but the run has no summary: failed, with the
    error line of the job's log."""
    from slm_cli.report.runs import FAILED, UNFINISHED, read_run

    copy = tmp_path / "slurm"
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns("checkpoints", "report"))
    for job, ended in (("0", True), ("1", False)):
        (copy / job / "summary.json").unlink()
        hydra_yaml = copy / job / ".hydra" / "hydra.yaml"
        cfg = yaml.safe_load(hydra_yaml.read_text())
        cfg["hydra"]["job"]["id"] = f"4242_{job}"
        hydra_yaml.write_text(yaml.safe_dump(cfg))
        folder = copy / ".submitit" / f"4242_{job}"
        folder.mkdir(parents=True)
        (folder / f"4242_{job}_0_log.err").write_text(
            "Traceback (most recent call last):\n  File x\nslm_cli.errors.SlmError: training loss became nan\n")
        if ended:
            (folder / f"4242_{job}_0_result.pkl").write_bytes(b"")
    failed, running = read_run(copy / "0"), read_run(copy / "1")
    assert failed.status == FAILED and "SlmError: training loss became nan" in failed.note
    assert running.status == UNFINISHED and running.sweep == copy.resolve()


# ---- input, defaults and the output folder ----------------------------------------------------

def test_bad_input_is_one_line(sweep: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(tmp_path / "empty")], "no runs in"),
        ([str(tmp_path / "nothing-*")], "no path matches"),
        ([str(tmp_path / "missing")], "does not exist"),
        ([str(sweep), f"runs=[{sweep}]"], "either as arguments or as runs="),
    ]
    for args, message in cases:
        proc = slm("report", *args, cwd=tmp_path)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = slm("report", cwd=tmp_path)  # nothing under ./outputs
    assert proc.returncode == 1 and "no runs under" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_no_argument_reports_the_latest_sweep(sweep: Path, tmp_path: Path) -> None:
    """Under outputs/ (paths.log_dir): the newest run's sweep, not an older sweep nor a lone run."""
    multirun = tmp_path / "outputs" / "train" / "multirun"
    for name in ("2026-01-01_00-00-00", "2026-01-02_00-00-00"):
        shutil.copytree(sweep, multirun / name, ignore=shutil.ignore_patterns("checkpoints", "report"))
    lone = tmp_path / "outputs" / "train" / "2026-01-01_12-00-00"
    shutil.copytree(sweep / "0", lone, ignore=shutil.ignore_patterns("checkpoints"))
    for i, config in enumerate(sorted(tmp_path.glob("outputs/**/.hydra/config.yaml"))):
        stamp = 1_700_000_000 + (10_000 if "01-02" in str(config) else i)
        os.utime(config, (stamp, stamp))
    ok(slm("report", cwd=tmp_path))
    assert (multirun / "2026-01-02_00-00-00" / "report" / "report.md").is_file()
    assert not (multirun / "2026-01-01_00-00-00" / "report").exists() and not (lone / "report").exists()


def test_positional_paths_become_one_hydra_list() -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from slm_cli.arguments import positional_to_override

    paths = ["outputs/train/multirun/2026-01-01_00-00-00", "runs/*/seed=1", "it's [odd], isn't it"]
    args = positional_to_override(["--cfg", "job", paths[0], "out=/tmp/r", paths[1], "+x=1", paths[2]], "runs")
    assert args[:5] == ["--cfg", "job", "out=/tmp/r", "+x=1", args[4]] and args[4].startswith("runs=[")
    parsed = OverridesParser.create().parse_overrides([args[4]])[0]
    assert parsed.key_or_group == "runs" and parsed.value() == paths
    assert positional_to_override(["out=x", "runs=[a]"], "runs") == ["out=x", "runs=[a]"]


def test_the_output_folder_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    from slm_cli.errors import SlmError
    from slm_cli.report.folder import staged_folder

    out = tmp_path / "report"
    out.mkdir()
    (out / "report.md").write_text("old")
    with pytest.raises(RuntimeError), staged_folder(out, "report.md") as stage:
        (stage / "report.md").write_text("half")
        raise RuntimeError("interrupted")
    assert (out / "report.md").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    with staged_folder(out, "report.md") as stage:
        (stage / "report.md").write_text("new")
    assert (out / "report.md").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("keep")
    with pytest.raises(SlmError, match="not an earlier report"), staged_folder(other, "report.md"):
        pass
    assert (other / "thesis.tex").read_text() == "keep"


def test_without_matplotlib_one_line_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from slm_cli.errors import SlmError
    from slm_cli.report.plot_style import pyplot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(SlmError, match=re.escape("pip install 'slm[report]'")):
        pyplot()


# ---- figures a reader takes in at a glance ---------------------------------------------------------

def test_point_labels_do_not_overlap() -> None:
    """Labels of a tight cluster of points: none on another label or on any point's marker, all
    inside the axes, where there is room for them."""
    from slm_cli.report.plot_style import place_labels

    rng = np.random.default_rng(0)
    anchors = [tuple(p) for p in rng.normal(300.0, 25.0, size=(14, 2))]
    sizes = [(float(rng.integers(30, 70)), 10.0) for _ in anchors]
    bounds = (0.0, 0.0, 600.0, 600.0)
    offsets = place_labels(anchors, sizes, bounds, marker=5.0)
    boxes = [(x + dx, y + dy, x + dx + w, y + dy + h)
             for (x, y), (dx, dy), (w, h) in zip(anchors, offsets, sizes, strict=True)]

    def overlaps(a: tuple, b: tuple) -> bool:  # open boxes: touching edges do not overlap
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    for i, a in enumerate(boxes):
        assert bounds[0] <= a[0] and a[2] <= bounds[2] and bounds[1] <= a[1] and a[3] <= bounds[3]
        assert not any(overlaps(a, b) for b in boxes[i + 1:]), i
        assert not any(overlaps(a, (x - 5, y - 5, x + 5, y + 5)) for x, y in anchors), i
    # each label stays near its point (a leader line is drawn beyond 14 pixels)
    assert max(max(abs(dx + w / 2), abs(dy + h / 2)) for (dx, dy), (w, h) in zip(offsets, sizes, strict=True)) < 140


def test_legend_leaves_the_panels_their_size() -> None:
    """Below the panels when it fits the figure's width in few rows, else beside them in one column;
    either way the panels keep the place tight_layout gave them."""
    from slm_cli.report.plot_style import legend, pyplot

    plt = pyplot()
    for count, beside in ((4, False), (24, True)):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
        for i in range(count):
            axes[0].plot([0, 1], [i, i + 1], label=f"Hierarchical ESLM (loss, windows 0.5, keep 0.{i}) warm start 100")
        fig.tight_layout()
        before = [v for ax in axes for v in ax.get_position().bounds]
        legend(fig, axes)
        box = fig.legends[0].get_window_extent(fig.canvas.get_renderer())
        assert [v for ax in axes for v in ax.get_position().bounds] == pytest.approx(before)
        assert (box.x0 >= fig.bbox.x1 - 1) == beside  # beside: to the right of the figure
        if not beside:
            assert box.width <= fig.bbox.width and box.y1 <= fig.bbox.y0 + 1  # below, within the width
        plt.close(fig)


def test_train_time_of_a_resumed_run_counts_on() -> None:
    """Each process's ThroughputMonitor starts from zero: the time before a resume carries on."""
    from slm_cli.report.curves import resumed_time

    first, second = [1.0, 2.5, 4.0], [0.5, 2.0, 3.0]  # a resume after 4.0 s, then 3.0 s more
    assert resumed_time(first + second).tolist() == pytest.approx(first + [4.0 + t for t in second])
    assert resumed_time(first).tolist() == first


def test_series_of_one_family_look_different() -> None:
    """CLM and CLM on RHO-1's grid are both grey: the second series of a family takes another line
    style and marker, so the two curves stay apart where they overlap."""
    from slm_cli.report.plot_style import styles
    from slm_cli.report.table import build_table

    onehot = conf("target", "onehot")
    runs = [run_with(selection=conf("selection", "clm"), target=onehot, model={"block_size": 128}, data={}),
            run_with(selection=conf("selection", "clm"), target=onehot, model={"block_size": 128},
                     data={"window_grid": 128})]
    style, series = styles(build_table(runs))
    assert sorted(series) == ["CLM", "CLM on RHO-1's grid"]
    (a,), (b,) = series["CLM"], series["CLM on RHO-1's grid"]
    assert (style[a].linestyle, style[a].marker) != (style[b].linestyle, style[b].marker)
