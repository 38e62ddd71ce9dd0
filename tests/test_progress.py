"""Progress as it reads where it is written: plain lines in a log (no carriage return, a bounded
number, the fields a reader needs), a bar on a terminal counting training steps of max_steps."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from slm_cli import progress
from slm_cli.errors import SlmError
from slm_cli.progress import Progress, line, quiet_bars, track
from tests.helpers import TINY_DATA, TINY_MODEL, ok, slm


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    """A perf_counter that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", fake)
    monkeypatch.delenv(progress.MODE_VAR, raising=False)
    monkeypatch.delenv(progress.EVERY_VAR, raising=False)
    return fake


def test_line_fields_rate_and_eta() -> None:
    # 245,760 tokens in 50 s: 4,915.2 tokens/s; 180 steps left at 120 steps per 50 s: 75 s.
    assert line("train", "step", 120, 300, done=120, tokens=245_760, elapsed=50.0,
                fields={"train/loss": 5.31849}) == (
        "train  step 120/300  40%  train/loss 5.318  4,915 tokens/s  elapsed 50 s  eta 75 s")
    # A resumed loop: the rate and the ETA count only the steps of this run (60 in 30 s; 140 left: 70 s).
    assert line("train", "step", 160, 300, done=60, tokens=0, elapsed=30.0, fields={}) == (
        "train  step 160/300  53%  2 step/s  elapsed 30 s  eta 70 s")
    # Unknown total, slower than one unit a second, closed.
    assert line("scoring", "batch", 3, None, done=3, tokens=0, elapsed=12.0, fields={}, final=True) == (
        "scoring  batch 3  4 s/batch  elapsed 12 s  done")
    assert line("train", "step", 7, 10, done=7, tokens=0, elapsed=7.0, fields={}, final=True).endswith("stopped")


def test_lines_every_interval_and_at_close(clock: Clock) -> None:
    out = io.StringIO()
    with Progress(100, "train", "step", stream=out) as p:
        for _ in range(100):
            clock.now += 1.0
            p.update(1, tokens=10, loss=2.0)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    # Updates at t = 1..100 s: lines at 30, 60 and 90 s, and the closing line.
    assert [re.search(r"step (\d+)/100", text).group(1) for text in lines] == ["30", "60", "90", "100"]
    assert all("loss 2  10 tokens/s" in text for text in lines)
    assert lines[0].endswith("eta 70 s") and lines[-1].endswith("elapsed 100 s  done")


def test_every_update_when_the_interval_is_zero(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(progress.EVERY_VAR, "0")
    out = io.StringIO()
    with Progress(3, "val", "batch", stream=out) as p:
        for _ in range(3):
            clock.now += 0.5
            p.update(1)
        p.set(**{"val/loss": 4.25})  # known after the last batch: one more line, the closing one
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[-1] == "val  batch 3/3  100%  val/loss 4.25  2 batch/s  elapsed 1.5 s  done"


def test_bar_on_a_terminal(clock: Clock) -> None:
    out = Terminal()
    with Progress(3, "train", "step", stream=out) as p:
        for _ in range(3):
            p.update(1, tokens=5, loss=1.5)
    text = out.getvalue()
    assert "\r" in text and "train: 100%" in text and "3/3" in text and "loss 1.5" in text


def test_the_display_follows_the_environment(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(progress.MODE_VAR, "off")
    out = Terminal()
    with Progress(2, "x", stream=out) as p:
        p.update(2)
    assert out.getvalue() == ""
    monkeypatch.setenv(progress.MODE_VAR, "lines")  # lines on a terminal too
    with Progress(2, "x", stream=out) as p:
        p.update(2)
    assert out.getvalue() == "x  it 2/2  100%  elapsed 0.0 s  done\n"
    out = io.StringIO()
    with Progress(2, "x", stream=out, disable=True) as p:
        p.update(2)
    assert out.getvalue() == ""
    monkeypatch.setenv(progress.MODE_VAR, "fancy")
    with pytest.raises(SlmError, match="SLM_PROGRESS=fancy .* one of auto, bar, lines, off"):
        Progress(2, "x", stream=out)
    monkeypatch.setenv(progress.MODE_VAR, "auto")
    monkeypatch.setenv(progress.EVERY_VAR, "soon")
    with pytest.raises(SlmError, match="SLM_PROGRESS_EVERY=soon is not a number of seconds"):
        Progress(2, "x", stream=out)


def test_track_yields_every_item_and_counts_them(clock: Clock, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    assert list(track(range(5), "items", "item")) == [0, 1, 2, 3, 4]
    assert capsys.readouterr().err == "items  item 5/5  100%  elapsed 0.0 s  done\n"
    assert list(track(iter("ab"), "letters", "letter")) == ["a", "b"]  # no length: no total
    assert capsys.readouterr().err.startswith("letters  letter 2  ")


def test_quiet_bars_silences_a_library_bar_in_a_log(monkeypatch: pytest.MonkeyPatch) -> None:
    from tqdm import tqdm
    from tqdm.auto import tqdm as auto_tqdm

    monkeypatch.delenv(progress.MODE_VAR, raising=False)
    out = io.StringIO()
    with quiet_bars(io.StringIO()):  # progress goes to a log: library bars are silenced
        for cls in (tqdm, auto_tqdm):
            for _ in cls(range(3), disable=False, file=out):
                pass
    assert out.getvalue() == ""
    for _ in tqdm(range(3), file=out):  # restored on exit
        pass
    assert "3/3" in out.getvalue()
    out = io.StringIO()
    with quiet_bars(Terminal()):  # on a terminal they stay
        for _ in tqdm(range(3), file=out):
            pass
    assert "3/3" in out.getvalue()


# ---- `slm train` itself -------------------------------------------------------------------------
TRAIN = [*TINY_DATA, *TINY_MODEL, "trainer.max_steps=12", "trainer.val_check_interval=6",
         "trainer.limit_val_batches=2", "trainer.checkpoint_every_n_steps=100"]


def test_training_in_a_log_is_plain_lines(tiny_data: Path, tmp_path: Path) -> None:
    """stdout and stderr to pipes, as in a SLURM job: plain lines, one per validation and one at the
    end (a run this short reaches no 30 s interval), with the step of max_steps, the loss, the
    tokens/s and the validation loss that metrics.csv holds."""
    env = {k: v for k, v in os.environ.items() if k not in (progress.MODE_VAR, progress.EVERY_VAR)}
    run = tmp_path / "run"
    proc = ok(subprocess.run([sys.executable, "-m", "slm_cli", "train", f"hydra.run.dir={run}",
                              f"paths.data_dir={tiny_data}", *TRAIN], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600))
    assert "\r" not in proc.stdout + proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    train_lines = [t for t in proc.stderr.splitlines() if t.startswith("train  ")]
    val_lines = [t for t in proc.stderr.splitlines() if t.startswith("val at step ")]
    assert len(train_lines) <= 1 + summary["wall_s"] // progress.EVERY_S
    final = train_lines[-1]
    assert final.startswith("train  step 12/12  100%  train/loss ") and final.endswith("done")
    assert " tokens/s  elapsed " in final
    with open(run / "metrics.csv") as f:
        logged = {int(r["step"]): float(r["val/loss"]) for r in csv.DictReader(f) if r["val/loss"]}
    # One line per validation, at the step it measures (the 0-based row label + 1), with its loss.
    assert [int(t.split()[3]) for t in val_lines] == [s + 1 for s in sorted(logged)] == [6, 12]
    for text, step in zip(val_lines, sorted(logged), strict=True):
        assert f"batch 2/2  100%  val/loss {logged[step]:.4g}  " in text and text.endswith("done")
    assert f"val/loss {summary['val_loss']:.4g}" in final


def test_training_on_a_terminal_counts_steps(tiny_data: Path, tmp_path: Path) -> None:
    """On a terminal: a bar per loop, training counted in steps of max_steps (not Lightning's
    `Epoch 0/-2`), validation in batches."""
    import fcntl
    import pty
    import struct
    import termios

    env = {k: v for k, v in os.environ.items() if k not in (progress.MODE_VAR, progress.EVERY_VAR)}
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "slm_cli", "train", f"hydra.run.dir={tmp_path / 'run'}",
                             f"paths.data_dir={tiny_data}", *TRAIN], cwd=tmp_path, env=env,
                            stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 1 << 16)
        except OSError:  # the terminal closes with the process
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=600) == 0
    text = b"".join(chunks).decode(errors="replace")
    frames = text.replace("\n", "\r").split("\r")
    assert any(re.match(r"train: 100%.*\| 12/12 \[.*(step/s|s/step), train/loss [\d.]+ .*tokens/s\]", f) for f in frames), frames
    assert any(re.match(r"val at step 6: 100%.*\| 2/2 ", f) for f in frames)
    assert "Epoch" not in text


def compose_train(*overrides: str):  # type: ignore[no-untyped-def]
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="slm_cli.conf", version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_build_trainer_takes_callbacks_and_the_progress_switch(tmp_path: Path) -> None:
    """Extra callbacks (a benchmark's clock) run first; trainer.enable_progress_bar=false shows nothing."""
    from lightning.pytorch.callbacks import Callback

    from slm_cli.trainer import StepProgress, build_trainer

    clock = Callback()
    trainer = build_trainer(compose_train(f"paths.output_dir={tmp_path}"), tmp_path, callbacks=[clock])
    assert trainer.callbacks[0] is clock and isinstance(trainer.progress_bar_callback, StepProgress)
    quiet = build_trainer(compose_train(f"paths.output_dir={tmp_path}", "trainer.enable_progress_bar=false"), tmp_path)
    assert quiet.progress_bar_callback is None
    assert not any(isinstance(c, StepProgress) for c in quiet.callbacks)


@pytest.mark.parametrize(("logger", "module"), [("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_a_logger_without_its_extra_names_it(logger: str, module: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from slm_cli.trainer import build_trainer

    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: find_spec answers None
    with pytest.raises(SlmError, match=re.escape(f"logger={logger} needs {module}, which is not installed: "
                                                 f"pip install 'slm[{logger}]'")):
        build_trainer(compose_train(f"paths.output_dir={tmp_path}", f"logger={logger}"), tmp_path)


def test_preparation_scoring_ngrams_and_evaluation_in_a_log_are_plain_lines(
        checkpointed_run: Path, tiny_data: Path, tmp_path: Path) -> None:
    """`slm prepare`, `slm ngram`, `slm score` and `slm eval` to pipes, a line per update
    (SLM_PROGRESS_EVERY=0): no carriage return, and each loop's last line reaches its total."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"document {i}: the quick brown fox jumps over the lazy dog.\n\n" for i in range(300)))
    env = {progress.MODE_VAR: "auto", progress.EVERY_VAR: "0"}
    ckpt = checkpointed_run / "checkpoints" / "last.ckpt"
    runs = {
        "tokenising": ("prepare", "data=text", f"data.path={corpus}", "data.vocab_size=300",
                       f"paths.data_dir={tmp_path / 'text'}"),
        "counting 2-grams": ("ngram", f"paths.data_dir={data}", *TINY_DATA, "ngram.n=2", "ngram.r=2"),
        "scoring": ("score", f"paths.data_dir={data}", *TINY_DATA, f"ckpt_path={ckpt}"),
        "eval val": ("eval", f"ckpt_path={checkpointed_run}", "max_batches=3"),
    }
    for desc, args in runs.items():
        proc = ok(slm(*args, cwd=tmp_path, env=env))
        assert "\r" not in proc.stdout + proc.stderr, desc
        lines = [t for t in proc.stderr.splitlines() if t.startswith(desc)]
        assert lines, f"{desc}: no progress line in\n{proc.stderr[-2000:]}"
        counts = [re.search(r"  \w+ ([\d,]+)/([\d,]+)  (\d+)%", t) for t in lines]
        assert all(counts), lines
        done = [int(m.group(1).replace(",", "")) for m in counts]
        total = int(counts[-1].group(2).replace(",", ""))
        assert done == sorted(done) and done[-1] == total and lines[-1].endswith("done"), lines
