"""The `slm` command line: help, config composition, experiments, multirun, non-editable install."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers import QUIET, TINY_DATA, TINY_MODEL, ok, slm

REPO = Path(__file__).resolve().parents[1]


def job_config(*overrides: str, cwd: Path, command: str = "train") -> dict:
    return yaml.safe_load(ok(slm(command, *overrides, "--cfg", "job", cwd=cwd)).stdout)


def test_help_lists_the_subcommands(tmp_path: Path) -> None:
    out = ok(slm("--help", cwd=tmp_path)).stdout
    for command in ("prepare", "train", "eval"):
        assert f"  {command} " in out
    help_text = ok(slm("train", "--help", cwd=tmp_path)).stdout
    assert "model: gpt2, gpt2-large, gpt2-medium, gpt2-micro, gpt2-mini, gpt2-nano, gpt2-xl" in help_text
    proc = slm("frobnicate", cwd=tmp_path)
    assert proc.returncode == 2 and "unknown command" in proc.stderr


def test_every_model_size_composes(tmp_path: Path) -> None:
    """GPT-2 sizes: (layers, heads, width) as published; the nano-to-mini sizes are slm's own."""
    sizes = {"gpt2-nano": (4, 4, 128), "gpt2-micro": (6, 6, 384), "gpt2-mini": (8, 8, 512), "gpt2": (12, 12, 768),
             "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}
    for name, (n_layer, n_head, n_embd) in sizes.items():
        model = job_config(f"model={name}", cwd=tmp_path)["model"]
        assert (model["n_layer"], model["n_head"], model["n_embd"]) == (n_layer, n_head, n_embd), name


def test_experiment_composes_and_command_line_wins(tmp_path: Path) -> None:
    cfg = job_config("+experiment=clm_gpt2", cwd=tmp_path)
    assert cfg["model"]["n_layer"] == 12 and cfg["data"]["name"] == "openwebtext"
    assert cfg["data"]["global_batch_size"] == 480
    cfg = job_config("+experiment=clm_gpt2", "data=stdlib", "model=gpt2-nano", "optim.lr=1e-3", cwd=tmp_path)
    assert cfg["model"]["n_layer"] == 4 and cfg["data"]["name"] == "stdlib" and cfg["optim"]["lr"] == 1e-3
    assert cfg["trainer"]["max_steps"] == 600000  # what the command line did not override stays


def test_experiment_with_or_without_plus(tmp_path: Path) -> None:
    """conf/train.yaml lists `experiment: null`, so `experiment=NAME` works; `slm train` reads the
    documented `+experiment=NAME` (which Hydra alone refuses then) the same way."""
    reference = yaml.safe_load((REPO / "conf" / "experiment" / "eslm_tiny.yaml").read_text())
    plus = job_config("+experiment=eslm_tiny", "seed=7", cwd=tmp_path)
    bare = job_config("experiment=eslm_tiny", "seed=7", cwd=tmp_path)
    assert plus == bare
    # The experiment comes after train.yaml's own keys (task_name is set in both) and before the command line.
    assert plus["task_name"] == reference["task_name"] == "eslm_tiny" and plus["seed"] == 7
    assert plus["selection"]["_target_"] == "slm_cli.selection.eslm.ESLM"
    assert job_config(cwd=tmp_path)["task_name"] == "train"  # no experiment: the default stays null
    proc = slm("train", "++experiment=eslm_tiny", "--cfg", "job", cwd=tmp_path)  # only + is read as =
    assert proc.returncode == 1 and "force-add of config groups is not supported" in proc.stderr


def test_non_editable_install_finds_its_configs(tmp_path: Path) -> None:
    """Install the package (not editable) into a folder and run it from elsewhere: conf/ must ship
    inside it as slm_cli.conf, and every subpackage must be in the install."""
    target = tmp_path / "site"
    # Built from a copy: setuptools reuses an in-tree build/ folder, which can hold files deleted since.
    source_copy = tmp_path / "source"
    source_copy.mkdir()
    for part in ("pyproject.toml", "README.md", "slm_cli", "conf", "corpora"):
        copy = shutil.copytree if (REPO / part).is_dir() else shutil.copy2
        copy(REPO / part, source_copy / part, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                                 if (REPO / part).is_dir() else {}))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source_copy)], check=True, capture_output=True)
    installed = {p.relative_to(target).with_suffix("").as_posix() for p in (target / "slm_cli").rglob("*.py")}
    source = {p.relative_to(REPO).with_suffix("").as_posix() for p in (REPO / "slm_cli").rglob("*.py")}
    assert source <= installed
    yamls = {p.relative_to(REPO / "conf").as_posix() for p in (REPO / "conf").rglob("*.yaml")}
    shipped = {p.relative_to(target / "slm_cli" / "conf").as_posix() for p in (target / "slm_cli/conf").rglob("*.yaml")}
    assert yamls == shipped
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, "-c", "import slm_cli, sys; print(slm_cli.__file__); "
                           "from slm_cli.__main__ import main; sys.exit(main())", "train", "+experiment=clm_tiny",
                           "--cfg", "job"], cwd=elsewhere, capture_output=True, text=True,
                          env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[0].startswith(str(target))
    assert yaml.safe_load("\n".join(proc.stdout.splitlines()[1:]))["task_name"] == "clm_tiny"


def test_gpt2_experiment_runs_with_small_overrides(tiny_data: Path, tmp_path: Path) -> None:
    """`+experiment=eslm_gpt2` composes, and command-line choices (data, model, steps) win."""
    run = tmp_path / "run"
    ok(slm("train", "+experiment=eslm_gpt2", "data=stdlib", "model=gpt2-nano", f"hydra.run.dir={run}",
           f"paths.data_dir={tiny_data}", *TINY_DATA, *TINY_MODEL, *QUIET, "trainer.max_steps=2",
           "data.global_batch_size=8", cwd=tmp_path))  # 8 windows = batch 4 × 2 micro-batches
    summary = json.loads((run / "summary.json").read_text())
    assert summary["selection"] == "eslm" and summary["model"] == "gpt2-nano" and summary["steps"] == 2
    assert summary["train_tokens"] == 2 * 2 * 4 * 32  # steps × micro-batches × batch × context


def test_wandb_offline_and_tensorboard_loggers(tiny_data: Path, tmp_path: Path) -> None:
    for logger, produced in (("wandb", "wandb"), ("tensorboard", "tensorboard")):
        run = tmp_path / logger
        ok(slm("train", f"logger={logger}", f"hydra.run.dir={run}", f"paths.data_dir={tiny_data}", *TINY_DATA,
               *TINY_MODEL, *QUIET, "trainer.max_steps=2", cwd=tmp_path, env={"WANDB_SILENT": "true"}))
        assert (run / "metrics.csv").is_file()  # csv is always written
        assert any((run / produced).iterdir())


def test_missing_launcher_plugin_is_one_line() -> None:
    from hydra.errors import MissingConfigException

    from slm_cli.__main__ import one_line

    exc = MissingConfigException("Could not load 'hydra/launcher/submitit_slurm'.\nConfig search path:\n\tprovider=x",
                                 missing_cfg_file="hydra/launcher/submitit_slurm")
    assert one_line(exc) == ("Could not load 'hydra/launcher/submitit_slurm': the SLURM launcher needs its plugin: "
                             "pip install 'slm[slurm]' (make install has it)")
