"""The optional extras: the main job needs none (`make train` installs none), and a command that
needs one says which in one line (the logger extras here; hf, report, eval, slurm in their tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import TINY_DATA, TINY_MODEL, ok

# Each extra's distributions (pyproject.toml) and the modules they bring.
EXTRA_DISTRIBUTIONS = {"wandb", "tensorboard", "tensorboardX", "hydra-submitit-launcher", "submitit", "matplotlib",
                       "transformers", "safetensors", "lm-eval"}
EXTRA_MODULES = {"wandb", "tensorboard", "tensorboardX", "submitit", "matplotlib", "transformers", "safetensors",
                 "lm_eval", "hydra_plugins.hydra_submitit_launcher"}

# Runs `slm ARGS` (or `-c CODE`) in a process where the extras look uninstalled: their distributions
# are hidden from importlib.metadata (which libraries such as torchmetrics consult before importing an
# optional module), `importlib.util.find_spec` answers None for their modules (a probe, as on a
# machine without them), and importing them fails. Every import attempted is written to a JSON file.
BOOTSTRAP = """
import atexit, importlib.abc, importlib.machinery, importlib.util, json, re, sys
dists, modules, out = set(json.loads(sys.argv[1])), set(json.loads(sys.argv[2])), sys.argv[3]
norm = lambda name: re.sub(r"[-_.]+", "-", name or "").lower()
hidden = {norm(d) for d in dists}
extra = lambda name: any(name == m or name.startswith(m + ".") for m in modules)
attempts = []
finder = importlib.machinery.PathFinder.find_distributions
importlib.machinery.PathFinder.find_distributions = staticmethod(
    lambda *a, **k: [d for d in finder(*a, **k) if norm(d.metadata["Name"]) not in hidden])
probe = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: None if extra(name) else probe(name, package)

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if extra(name):
            attempts.append(name)
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Absent())
atexit.register(lambda: open(out, "w").write(json.dumps(attempts)))
args = sys.argv[4:]
if args[0] == "-c":
    exec(args[1])
else:
    sys.argv = ["slm", *args]
    from slm_cli.__main__ import entry
    entry()
"""


def without_extras(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    attempts = cwd / "attempted_imports.json"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run([sys.executable, "-c", BOOTSTRAP, json.dumps(sorted(EXTRA_DISTRIBUTIONS)),
                           json.dumps(sorted(EXTRA_MODULES)), str(attempts), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return proc, json.loads(attempts.read_text()) if attempts.is_file() else []


def test_the_bootstrap_hides_the_extras(tmp_path: Path) -> None:
    """The check below can fail: an import of an extra fails and is recorded; its distribution and
    its module look absent to the probes libraries use."""
    proc, attempted = without_extras("-c", "import matplotlib.pyplot", cwd=tmp_path)
    assert proc.returncode != 0 and "No module named 'matplotlib'" in proc.stderr
    assert attempted == ["matplotlib"]
    probes = ("import importlib.metadata as m, importlib.util as u\n"
              "assert u.find_spec('lm_eval') is None and u.find_spec('json') is not None\n"
              "try:\n    m.version('lm-eval')\nexcept m.PackageNotFoundError:\n    print('hidden')")
    proc, attempted = without_extras("-c", probes, cwd=tmp_path)
    assert ok(proc).stdout.strip() == "hidden" and attempted == []


def test_default_training_needs_no_extra(tiny_data: Path, tmp_path: Path) -> None:
    """`slm train` with the default config (csv logger, cpu trainer, stdlib data, here cut small)
    runs to its summary with every extra absent, and never tries to import one."""
    run = tmp_path / "run"
    proc, attempted = without_extras("train", f"hydra.run.dir={run}", f"paths.data_dir={tiny_data}", *TINY_DATA,
                                     *TINY_MODEL, "trainer.max_steps=2", "trainer.val_check_interval=2",
                                     "trainer.limit_val_batches=1", cwd=tmp_path)
    ok(proc)
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    assert attempted == [], f"the default job tried to import extras: {attempted}"
