"""Shell completion: `slm -sc install=bash`, the queries its script makes, and the script in bash.

The expected candidates come from the config tree's files and the COMMANDS table, not from Hydra.
"""

from __future__ import annotations

import os
import pty
import select
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slm_cli.__main__ import COMMANDS
from tests.helpers import ok, slm

CONF = Path(__file__).resolve().parents[1] / "conf"
SELECTIONS = sorted(p.stem for p in (CONF / "selection").glob("*.yaml"))
BIN = Path(sys.executable).parent  # the venv's bin: its `slm` is what the script calls
BASH = shutil.which("bash")
needs_bash = pytest.mark.skipif(BASH is None or not (BIN / "slm").exists(), reason="needs bash and the slm script")


def install_script(tmp_path: Path) -> str:
    return ok(slm("train", "-sc", "install=bash", cwd=tmp_path)).stdout


def query(line: str, tmp_path: Path, *args: str) -> list[str]:
    """What the completion script gets back for ``line`` (the cursor at its end)."""
    proc = ok(slm(*args, "-sc", "query=bash", cwd=tmp_path, env={"COMP_LINE": line, "COMP_POINT": str(len(line))}))
    return proc.stdout.split()


def test_install_prints_a_bash_script_for_slm(tmp_path: Path) -> None:
    text = install_script(tmp_path)
    assert text == ok(slm("-sc", "install=bash", cwd=tmp_path)).stdout  # with or without a command
    assert "_slm_completion()" in text
    assert text.strip().splitlines()[-1] == "complete -o nospace -o default -F _slm_completion slm"
    if BASH:
        syntax = subprocess.run([BASH, "-n"], input=text, capture_output=True, text=True)
        assert syntax.returncode == 0, syntax.stderr
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        round_trip = ('eval "$(slm -sc install=bash)"; complete -p slm; eval "$(slm -sc uninstall=bash)"; '
                      "complete -p slm 2>/dev/null || echo unregistered; type _slm_completion &>/dev/null || echo gone")
        out = subprocess.run([BASH, "-c", round_trip], env=env, capture_output=True, text=True).stdout.splitlines()
        assert out == ["complete -o default -o nospace -F _slm_completion slm", "unregistered", "gone"]


def test_bad_requests_are_one_line(tmp_path: Path) -> None:
    proc = slm("-sc", "install=fish", cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "bash only" in proc.stderr
    env = {k: v for k, v in os.environ.items() if k != "COMP_LINE"}
    proc = subprocess.run([sys.executable, "-m", "slm_cli", "-sc", "query=bash"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "COMP_LINE" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_queries(tmp_path: Path) -> None:
    assert query("slm tr", tmp_path) == ["train"]
    assert query("slm ", tmp_path) == list(COMMANDS)
    assert query("slm frobnicate ", tmp_path) == []
    assert query("slm train selection=", tmp_path) == [f"selection={name}" for name in SELECTIONS]
    assert "selection=eslm" in query("slm train selection=e", tmp_path)
    # The same through the command, as Hydra's own help shows (`slm train -sc ...`).
    assert query("slm train selection=", tmp_path, "train") == [f"selection={name}" for name in SELECTIONS]
    # Finished words compose first, the way `slm train` reads them (+experiment= included).
    assert "selection=" in query("slm train +experiment=clm_tiny sel", tmp_path)
    assert query("slm train experiment=random_t", tmp_path) == ["experiment=random_tiny"]
    assert query("slm train model.n_l", tmp_path) == ["model.n_layer="]
    assert query("slm train selection=eslm selection.alp", tmp_path) == ["selection.alpha="]
    # Up to the cursor only: the rest of the line is ignored.
    line = "slm train selection= trainer.max_steps=5"
    env = {"COMP_LINE": line, "COMP_POINT": str(len("slm train selection="))}
    assert ok(slm("-sc", "query=bash", cwd=tmp_path, env=env)).stdout.split() == [f"selection={s}" for s in SELECTIONS]


def complete_in_bash(script: str, words: list[str], cwd: Path) -> list[str]:
    """COMPREPLY of the installed function for the line ``words`` (the cursor at its end), with
    COMP_WORDS split at '=' as bash splits them."""
    line = " ".join(words)
    comp_words: list[str] = []
    for word in words:
        parts = word.split("=")
        comp_words += [p for part in parts[:-1] for p in (part, "=") if p] + ([parts[-1]] if parts[-1] else [])
    program = f"""{script}
COMP_LINE={shlex.quote(line)}; COMP_POINT=${{#COMP_LINE}}
COMP_WORDS=({" ".join(shlex.quote(w) for w in comp_words)}); COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
_slm_completion
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([BASH, "-c", program], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


@needs_bash
def test_the_installed_function_fills_compreply(tmp_path: Path) -> None:
    script = install_script(tmp_path)
    (tmp_path / "corpus").mkdir()
    assert complete_in_bash(script, ["slm", "tr"], tmp_path) == ["train"]
    # bash replaces only what follows the '=', so that is what the function replies.
    assert complete_in_bash(script, ["slm", "train", "selection="], tmp_path) == SELECTIONS
    assert complete_in_bash(script, ["slm", "train", "selection=es"], tmp_path) == ["eslm"]
    assert complete_in_bash(script, ["slm", "train", "model.n_l"], tmp_path) == ["model.n_layer="]
    assert complete_in_bash(script, ["slm", "prepare", f"data.path={tmp_path}/cor"], tmp_path) == [f"{tmp_path}/corpus/"]


@needs_bash
def test_tab_in_an_interactive_bash(tmp_path: Path) -> None:
    """Real readline: type a line and TAB in an interactive bash, and read back what it completed."""
    script = tmp_path / "slm-completion.bash"
    script.write_text(install_script(tmp_path))
    pid, fd = pty.fork()
    if pid == 0:  # the child: an interactive bash without the user's rc files
        os.chdir(tmp_path)
        os.environ.update(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PS1="$ ", TERM="dumb")
        os.execv(BASH, [BASH, "--norc", "--noprofile", "-i"])

    def read_until(text: str, timeout: float = 120) -> str:
        seen, end = "", time.monotonic() + timeout
        while text not in seen and time.monotonic() < end:
            if select.select([fd], [], [], 0.5)[0]:
                seen += os.read(fd, 4096).decode(errors="replace")
        return seen

    try:
        os.write(fd, f"source {script}; echo sour''ced\n".encode())
        assert "sourced" in read_until("sourced")
        os.write(fd, b"slm tr\t")
        assert "slm train " in read_until("slm train ")
        os.write(fd, b"selection=es\t")
        assert "selection=eslm " in read_until("selection=eslm ")
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(fd)
