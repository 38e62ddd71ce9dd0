"""`slm prepare`, `slm score` and `slm ngram` killed with SIGKILL at several points of their write:
nothing they leave is taken as valid by the loaders, the staging folders and locks of the killed runs
block nothing, and the rerun completes with the same bytes as an uninterrupted run.

The points are driven by ``SLM_KILL_AT`` (slm_cli/data/sidecar.py), which makes the process kill
itself there: ``staged`` (the old meta.json removed, a staging folder made), ``bin`` (part of a token
stream written), ``moved`` (the first file moved into place, the others still old), ``commit`` (every
file in place, meta.json not yet written). Each killed run rewrites a folder that was complete
before, so an old meta.json blessing new files would be caught.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from slm_cli.data.corpora import corpus_path
from slm_cli.data.prepared import load_prepared
from slm_cli.data.sidecar import KILL_ENV, STAGED_PREFIX, lock_path
from slm_cli.errors import SlmError
from slm_cli.model.gpt import GPT, GPTConfig
from slm_cli.ngram.build import load_ngram
from slm_cli.reference.scores import load_scores_and_meta
from tests.helpers import ok, slm

VOCAB = 300
DATA = ["data=text", "data.name=c", "data.vocab_size={vocab}"]
PREPARED = ("train.bin", "val.bin", "tokenizer.json")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 40 KB of WikiText-2 paragraphs (more than 20 documents: the document-level split)."""
    text = Path(corpus_path("wikitext-2/valid.txt")).read_text()
    path = tmp_path_factory.mktemp("corpus") / "c.txt"
    path.write_text(text[: text.index("\n", 40_000)])
    return path


def run(command: str, data_dir: Path, corpus: Path, *args: str, vocab: int = VOCAB, kill_at: str | None = None):
    """`slm COMMAND` on the corpus (one thread: the same floats in every run); killed at ``kill_at``."""
    env = {"OMP_NUM_THREADS": "1", **({KILL_ENV: kill_at} if kill_at else {})}
    data = [d.format(vocab=vocab) for d in DATA]
    proc = slm(command, f"paths.data_dir={data_dir}", *data, f"data.path={corpus}", *args, cwd=data_dir, env=env)
    if kill_at:
        assert proc.returncode == -signal.SIGKILL, f"{command} was not killed at {kill_at}:\n{proc.stderr[-3000:]}"
    else:
        ok(proc)
    return proc


def files(folder: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in names}


def meta_without_time(folder: Path) -> dict:
    meta = json.loads((folder / "meta.json").read_text())
    return {k: v for k, v in meta.items() if k not in ("created", "seconds")}


def killed_runs_leave_nothing_valid(folder: Path, points: list[str], kill: Callable[[str], object],
                                    refuse: Callable[[], object], refusal: str) -> None:
    """Kill at each point in turn, each run starting from what the last one left: the loader refuses
    the folder every time, and the killed run's staging folder and lock are left behind."""
    for point in points:
        kill(point)
        assert not (folder / "meta.json").exists(), point
        with pytest.raises(SlmError, match=refusal):
            refuse()
        assert lock_path(folder).exists()  # a lock file whose flock died with the process
        if point != "commit":  # at the commit, the staging folder is already empty and gone
            assert list(folder.glob(f"{STAGED_PREFIX}*")), point


def no_leftovers(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]


# ---- slm prepare ----------------------------------------------------------------------------------
def test_killed_prepare(corpus: Path, tmp_path: Path) -> None:
    run("prepare", tmp_path, corpus)
    folder = tmp_path / "c"
    want, want_meta = files(folder, PREPARED), meta_without_time(folder)
    # A setting changes, so the complete folder is rebuilt, and killed on the way; then the rerun.
    # The second round rebuilds the first settings: its rerun must give the first run's bytes.
    for vocab, points in ((VOCAB - 20, ["staged", "moved"]), (VOCAB, ["bin", "commit"])):
        killed_runs_leave_nothing_valid(folder, points,
                                        lambda point, v=vocab: run("prepare", tmp_path, corpus, vocab=v, kill_at=point),
                                        lambda: load_prepared(folder), "no prepared data")
        run("prepare", tmp_path, corpus, vocab=vocab)
        assert load_prepared(folder).vocab_size == vocab
        no_leftovers(folder)
    assert files(folder, PREPARED) == want and meta_without_time(folder) == want_meta


# ---- slm ngram ------------------------------------------------------------------------------------
def test_killed_ngram(corpus: Path, tmp_path: Path) -> None:
    run("ngram", tmp_path, corpus, "ngram.n=3", "ngram.r=4")
    prepared = load_prepared(tmp_path / "c")
    folder = prepared.dir / "ngram-n3-r4"
    want, want_meta = files(folder, ("ids.npy", "probs.npy")), meta_without_time(folder)
    killed_runs_leave_nothing_valid(
        folder, ["staged", "moved", "commit"],
        lambda point: run("ngram", tmp_path, corpus, "ngram.n=3", "ngram.r=4", "ngram.force=true", kill_at=point),
        lambda: load_ngram(prepared, 3, 4), "no 3-gram top-4 arrays")
    run("ngram", tmp_path, corpus, "ngram.n=3", "ngram.r=4")
    assert files(folder, ("ids.npy", "probs.npy")) == want and meta_without_time(folder) == want_meta
    no_leftovers(folder)


# ---- slm score ------------------------------------------------------------------------------------
def reference_checkpoint(tokenizer: Path, out: Path) -> Path:
    """An slm checkpoint of a small random GPT with the corpus's tokenizer (what `slm score` reads)."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16)
    model = GPT(config)
    torch.save({"slm": {"model": vars(config), "tokenizer_json": tokenizer.read_text()},
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, out)
    return out


def test_killed_score(corpus: Path, tmp_path: Path) -> None:
    run("prepare", tmp_path, corpus)
    prepared = load_prepared(tmp_path / "c")
    ckpt = reference_checkpoint(prepared.tokenizer_path, tmp_path / "ref.ckpt")
    folder = prepared.dir / "ref-ref"
    run("score", tmp_path, corpus, f"ckpt_path={ckpt}")
    arrays = ("ref_loss.npy", "ref_entropy.npy")
    want, want_meta = files(folder, arrays), meta_without_time(folder)
    assert np.isfinite(np.load(folder / "ref_loss.npy")[1:]).all()
    killed_runs_leave_nothing_valid(
        folder, ["staged", "moved", "commit"],
        lambda point: run("score", tmp_path, corpus, f"ckpt_path={ckpt}", kill_at=point),
        lambda: load_scores_and_meta(prepared, name="ref"), "needs reference losses")
    # Another name finds no committed folder either: the killed one is not picked up.
    with pytest.raises(SlmError, match="needs reference losses .*no ref-. folder"):
        load_scores_and_meta(prepared)
    run("score", tmp_path, corpus, f"ckpt_path={ckpt}")
    assert files(folder, arrays) == want and meta_without_time(folder) == want_meta
    no_leftovers(folder)
