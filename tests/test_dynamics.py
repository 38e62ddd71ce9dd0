"""`slm dynamics`: on a small real run (checkpoints at steps 10 and 20, last.ckpt at 25), the
per-token losses equal an independent float64 forward, the trend and class of every token equal a
brute-force least-squares fit (numpy lstsq per token) and the paper's rule written out again, and
the shares, plot and page are written. A dir without checkpoints fails in one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from tests.helpers import float64_token_stats, ok, slm

N_TOKENS = 640  # 20 windows of the tiny model's 32-token context


def brute_force(x: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fitted loss at the first and last x, per token, by numpy's least squares one token at a time."""
    A = np.stack([x, np.ones_like(x)], axis=1)
    start, end = np.empty(losses.shape[1]), np.empty(losses.shape[1])
    for j in range(losses.shape[1]):
        (a, b), *_ = np.linalg.lstsq(A, losses[:, j], rcond=None)
        start[j], end[j] = a * x[0] + b, a * x[-1] + b
    return start, end


def paper_rule(start: np.ndarray, end: np.ndarray, last: np.ndarray, trend: float, level: float) -> list[str]:
    """RHO-1, Appendix B: a fitted change beyond ±trend is a fall or a rise; otherwise the level of
    the last checkpoint's loss against the mean decides."""
    out = []
    for s, e, l_last in zip(start, end, last, strict=True):
        if e - s < -trend:
            out.append("H→L")
        elif e - s > trend:
            out.append("L→H")
        else:
            out.append("H→H" if l_last > level else "L→L")
    return out


def read_tokens(folder: Path) -> tuple[list[dict[str, str]], list[int]]:
    with open(folder / "tokens.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    steps = [int(k[len("loss_step"):]) for k in rows[0] if k.startswith("loss_step")]
    return rows, steps


def test_dynamics_against_brute_force(checkpointed_run: Path, tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "dyn"
    proc = ok(slm("dynamics", f"run={checkpointed_run}", f"data_dir={tiny_data}", f"tokens={N_TOKENS}",
                  f"out={out}", "examples=2", cwd=tmp_path))
    assert "RHO-1" in proc.stdout and "51%" in proc.stdout  # the paper's shares printed beside ours
    # the first line names the data: the run's own (its data_dir given here)
    assert proc.stdout.splitlines()[0] == f"dynamics: {checkpointed_run}'s data (name=tiny source=stdlib " \
                                          f"data_dir={tiny_data}), split val"
    summary = json.loads((out / "dynamics.json").read_text())
    rows, steps = read_tokens(out)
    # step*.ckpt in step order, then last.ckpt because its step (25) is later
    assert steps == [10, 20, 25] == [c["step"] for c in summary["checkpoints"]]
    assert summary["tokens"] == len(rows) == N_TOKENS
    losses = np.array([[float(r[f"loss_step{s}"]) for r in rows] for s in steps])  # (K, N)

    # 1. The losses are each checkpoint's, on the first N val tokens in 32-token windows.
    meta = json.loads((tiny_data / "tiny" / "meta.json").read_text())
    val = np.memmap(tiny_data / "tiny" / "val.bin", dtype=meta["dtype"], mode="r").astype(np.int64)
    assert [int(r["token_id"]) for r in rows] == val[1: N_TOKENS + 1].tolist()
    windows = val[: N_TOKENS + 1]
    inputs = np.stack([windows[k: k + 32] for k in range(0, N_TOKENS, 32)])
    labels = np.stack([windows[k + 1: k + 33] for k in range(0, N_TOKENS, 32)])
    for step, path in [(10, "step0000010.ckpt"), (25, "last.ckpt")]:
        expect, _ = float64_token_stats(checkpointed_run / "checkpoints" / path, inputs, labels)
        np.testing.assert_allclose(losses[steps.index(step)], expect.reshape(-1), atol=1e-4, rtol=0)

    # 2. The fit (x = step, the default) and the classes, by brute force.
    x = np.array(steps, dtype=np.float64)
    start, end = brute_force(x, losses)
    np.testing.assert_allclose([float(r["fit_start"]) for r in rows], start, atol=1e-6, rtol=0)
    np.testing.assert_allclose([float(r["fit_end"]) for r in rows], end, atol=1e-6, rtol=0)
    level = losses[-1].mean()
    assert abs(summary["high_loss"] - level) < 1e-9
    expect_classes = paper_rule(start, end, losses[-1], trend=0.2, level=level)
    assert [r["class"] for r in rows] == expect_classes
    counts = {c: expect_classes.count(c) for c in ("H→H", "L→H", "H→L", "L→L")}
    with open(out / "classes.csv", newline="") as f:
        shares = {r["class"]: r for r in csv.DictReader(f)}
    for c, n in counts.items():
        assert int(shares[c]["tokens"]) == n == summary["classes"][c]["tokens"]
        assert abs(float(shares[c]["share"]) - n / N_TOKENS) < 1e-6
        mean = losses[:, np.array(expect_classes) == c].mean(axis=1).tolist() if n else None
        assert mean is None or np.allclose(summary["classes"][c]["mean_loss"], mean, atol=1e-6)
    assert sum(counts.values()) == N_TOKENS and len([n for n in counts.values() if n]) >= 2

    # 3. The figure and the page.
    from PIL import Image

    pixels = np.asarray(Image.open(out / "dynamics.png").convert("RGB"), dtype=np.float64)
    assert pixels.std() > 20
    page = (out / "dynamics.html").read_text()
    assert page.count('class="tok mark') >= 2 and "https://" not in page

    # 4. The other rule and x axis, in process on the same losses, against the same brute force.
    from slm_cli.report.dynamics_classes import CLASSES, classify

    index = np.arange(len(steps), dtype=np.float64)
    got = classify(index, losses, rule="levels", high_loss=5.5)
    start_i, end_i = brute_force(index, losses)
    np.testing.assert_allclose(got.start, start_i, atol=1e-9)
    np.testing.assert_allclose(got.end, end_i, atol=1e-9)
    levels = [("H" if s > 5.5 else "L") + "→" + ("H" if e > 5.5 else "L") for s, e in zip(start_i, end_i, strict=True)]
    assert [CLASSES[i] for i in got.labels] == levels
    # Uneven checkpoints (10, 20, 25): fitting against the index is not the same line as against the step.
    assert not np.allclose(start_i, start)


def test_no_checkpoints_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    proc = slm("dynamics", f"run={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "0 checkpoints" in proc.stderr and "trainer.checkpoint_every_n_steps" in proc.stderr
    assert not (tmp_path / "run" / "dynamics").exists()
