"""Commands given a run follow it (slm_cli/run_settings.py): a run trained on `data=text` with
`selection=eslm selection.score=entropy`, then `slm eval` evaluates that run's own validation split
in its own prepared folder (nothing tokenised again) and `slm tokens` marks what entropy-ESLM keeps;
the command line still wins, setting by setting; a run's config is read from its checkpoint or
its .hydra/config.yaml, and a model without one keeps the command's defaults."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from slm_cli.run_settings import follow, run_config
from tests.helpers import QUIET, TINY_MODEL, float64_token_stats, ok, slm
from tests.test_tokens import assert_marks, parse, top_k

BLOCK = 32  # TINY_MODEL's context
ALPHA = 0.4  # conf/selection/eslm.yaml's: keeps the 60% highest scores


@pytest.fixture(scope="module")
def text_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 steps of `selection=eslm selection.score=entropy` on a small text file (data=text)."""
    root = tmp_path_factory.mktemp("text_run")
    corpus = root / "corpus.txt"
    corpus.write_text(Path(argparse.__file__).read_text() * 2)
    ok(slm("train", f"hydra.run.dir={root / 'run'}", f"paths.data_dir={root / 'data'}", "data=text",
           f"data.path={corpus}", "data.vocab_size=512", "data.batch_size=4", *TINY_MODEL, *QUIET,
           "trainer.max_steps=10", "selection=eslm", "selection.score=entropy", cwd=root))
    return root / "run"


def data_folders(run: Path) -> list[str]:
    return sorted(p.name for p in (run.parent / "data").iterdir())


def val_windows(prepared: Path, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` non-overlapping validation windows of a prepared folder: (inputs, labels)."""
    meta = json.loads((prepared / "meta.json").read_text())
    val = np.memmap(prepared / "val.bin", dtype=meta["dtype"], mode="r").astype(np.int64)
    starts = range(0, count * BLOCK, BLOCK)
    return (np.stack([val[s: s + BLOCK] for s in starts]), np.stack([val[s + 1: s + BLOCK + 1] for s in starts]))


def eval_loss(stdout: str) -> float:
    return float(re.search(r"eval val: loss (\S+)", stdout).group(1))


def test_eval_follows_the_run(text_run: Path, tmp_path: Path) -> None:
    """`slm eval ckpt_path=<run>`: the run's validation split in the run's prepared folder; its loss
    is the run's final validation loss (the same 16 windows) and a float64 forward's."""
    summary = json.loads((text_run / "summary.json").read_text())
    before = data_folders(text_run)
    corpus = text_run.parent / "corpus.txt"
    for args in (["max_batches=4"], ["data.batch_size=8", "max_batches=2"]):  # a key inside data keeps the run's data
        out = ok(slm("eval", f"ckpt_path={text_run}", *args, cwd=tmp_path)).stdout
        first = out.splitlines()[0]
        assert first.startswith(f"eval: {text_run}'s data (source=files path={corpus} "), first
        assert first.endswith(", split val") and f"({summary['data']})" in out
        assert data_folders(text_run) == before  # nothing prepared again
        assert eval_loss(out) == pytest.approx(summary["val_loss"], abs=1e-4)  # printed with 4 decimals
    loss, _ = float64_token_stats(text_run / "checkpoints" / "last.ckpt", *val_windows(Path(summary["data"]), 16))
    assert eval_loss(out) == pytest.approx(loss.mean(), abs=1e-4)


def test_eval_reports_where_the_losses_lie(text_run: Path, tmp_path: Path) -> None:
    """`slm eval out=...`: the per-token losses' quantiles and the share below ln 2, against a
    float64 forward over the same windows and numpy's sorted-order definition of a quantile."""
    summary = json.loads((text_run / "summary.json").read_text())
    out = tmp_path / "eval.json"
    stdout = ok(slm("eval", f"ckpt_path={text_run}", "max_batches=4", f"out={out}", cwd=tmp_path)).stdout
    result = json.loads(out.read_text())
    loss, _ = float64_token_stats(text_run / "checkpoints" / "last.ckpt", *val_windows(Path(summary["data"]), 16))
    loss = np.sort(np.asarray(loss, dtype=np.float64).ravel())
    assert result["tokens"] == loss.size
    for q, value in result["loss_quantiles"].items():
        position = float(q) * (loss.size - 1)  # linear interpolation between the two order statistics
        low = int(np.floor(position))
        high = min(low + 1, loss.size - 1)
        expect = loss[low] + (position - low) * (loss[high] - loss[low])
        assert value == pytest.approx(expect, abs=1e-4), q
    easy = np.count_nonzero(loss < np.log(2)) / loss.size
    near = np.count_nonzero(np.abs(loss - np.log(2)) < 1e-4) / loss.size  # float32 may fall either side
    assert abs(result["easy_frac"] - easy) <= near
    assert f"p50 {result['loss_quantiles']['0.5']:.3f}" in stdout and f"below ln 2 {easy:.2%}" in stdout


def test_eval_command_line_data_wins(text_run: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    out = ok(slm("eval", f"ckpt_path={text_run}", "data=stdlib", "data.max_bytes=20000", f"paths.data_dir={other}",
                 "max_batches=1", cwd=tmp_path)).stdout
    assert out.splitlines()[0] == f"eval: data (name=stdlib source=stdlib data_dir={other}), split val"
    (prepared,) = [p for p in other.iterdir() if not p.name.startswith(".")]  # tokenised with the run's tokenizer
    assert prepared.name.startswith("stdlib") and f"({prepared})" in out


def test_a_hugging_face_folder_keeps_the_defaults(text_run: Path, tmp_path: Path) -> None:
    """An export carries no run config: conf/eval.yaml's data unless given, here the run's corpus
    by hand, which finds the run's own folder (the same tokenizer) and the run's validation loss."""
    pytest.importorskip("transformers")
    from slm_cli.model.export import export

    folder = export(text_run, tmp_path / "hf")
    summary = json.loads((text_run / "summary.json").read_text())
    before = data_folders(text_run)
    out = ok(slm("eval", f"ckpt_path={folder}", "data=text", f"data.path={text_run.parent / 'corpus.txt'}",
                 f"paths.data_dir={text_run.parent / 'data'}", "data.batch_size=4", "max_batches=4",
                 cwd=tmp_path)).stdout
    assert out.splitlines()[0].startswith("eval: data (source=files path=")
    assert data_folders(text_run) == before and f"({summary['data']})" in out
    assert eval_loss(out) == pytest.approx(summary["val_loss"], abs=1e-4)


def test_tokens_marks_the_runs_selection(text_run: Path, tmp_path: Path) -> None:
    """`slm tokens ckpt_path=<run> split=val`: the run's own val windows, marked by entropy-ESLM (the
    run's selection), against a brute-force top-k of float64 entropies; selection.score=loss on the
    command line marks the top-k of the losses instead."""
    prepared = Path(json.loads((text_run / "summary.json").read_text())["data"])
    inputs, labels = val_windows(prepared, 2)
    loss, entropy = float64_token_stats(text_run / "checkpoints" / "last.ckpt", inputs[1:], labels[1:])
    k = math.ceil((1 - ALPHA) * BLOCK)
    assert not np.array_equal(top_k(loss[0], k), top_k(entropy[0], k))  # the two selections differ here
    for override, values in (([], entropy[0]), (["selection.score=loss"], loss[0])):
        page = tmp_path / "page.html"
        out = ok(slm("tokens", f"ckpt_path={text_run}", "split=val", "window=1", f"out={page}", *override,
                     cwd=tmp_path)).stdout
        score = "loss" if override else "entropy"
        assert out.splitlines()[0].startswith(f"tokens: {text_run}'s selection (eslm score={score} alpha={ALPHA}), "
                                              f"{text_run}'s data (source=files")
        spans = parse(page.read_text()).spans
        assert [int(s["data-token-id"]) for s in spans] == labels[1].tolist()
        np.testing.assert_allclose([float(s["data-entropy"]) for s in spans], entropy[0], atol=1e-4, rtol=0)
        assert_marks(np.array([s["data-selected"] == "1" for s in spans]), values, ratio=1 - ALPHA)


def test_run_config_from_the_checkpoint_or_hydra(text_run: Path, tmp_path: Path) -> None:
    """The checkpoint's resolved config, or else .hydra/config.yaml resolved (as when it trained)."""
    entry = torch.load(text_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["slm"]
    from_ckpt = run_config(text_run / "checkpoints" / "last.ckpt", entry)
    assert from_ckpt["data"]["path"] == str(text_run.parent / "corpus.txt")
    from_hydra = run_config(text_run, {**entry, "config": {}})
    assert from_hydra["data"] == from_ckpt["data"] and from_hydra["selection"] == from_ckpt["selection"]
    assert from_hydra["paths"]["data_dir"] == from_ckpt["paths"]["data_dir"]
    assert run_config(tmp_path, {"config": {}}) == {}  # a Hugging Face folder: no run config


def test_follow_takes_what_the_command_line_did_not_set() -> None:
    """Outside a Hydra app nothing was set on the command line: every key the run has is followed;
    a run without a config (a Hugging Face folder) leaves the command's defaults."""
    cfg = OmegaConf.create({"data": {"name": "stdlib", "source": "stdlib", "batch_size": 16},
                            "paths": {"data_dir": "data"}, "selection": {"name": "eslm", "score": "loss"}})
    run = {"data": {"name": None, "source": "files", "path": "c.txt", "batch_size": 4},
           "paths": {"data_dir": "/d"}, "selection": {"name": "rho1", "ratio": 0.6}}
    followed, taken = follow(cfg, run, ("data", "paths.data_dir", "selection"))
    assert taken == ["data", "paths.data_dir", "selection"]
    assert OmegaConf.to_container(followed.data) == run["data"] and followed.paths.data_dir == "/d"
    assert OmegaConf.to_container(followed.selection) == run["selection"]
    assert cfg.data.source == "stdlib"  # the command's config itself is unchanged
    same, taken = follow(cfg, {}, ("data", "selection"))
    assert taken == [] and same == cfg
