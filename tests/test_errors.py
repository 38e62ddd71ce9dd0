"""Bad input: one line naming the problem and the fix, a non-zero exit, no traceback, and nothing
half-written that looks valid."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import QUIET, TINY_DATA, TINY_MODEL, ok, slm


def fails(proc, *words: str) -> str:
    """Assert the command failed with one error line on stderr that contains `words` (progress bars
    of work done before the failure may precede it; nothing may follow it)."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("slm ") or "error" in line.lower()]
    assert len(errors) == 1 and errors[0] == lines[-1], proc.stderr[-3000:]
    for word in words:
        assert word.lower() in errors[0].lower(), (word, errors[0])
    return errors[0]


def bad_train(tmp_path: Path, data_dir: Path, *overrides: str):
    run = tmp_path / "run"
    proc = slm("train", f"hydra.run.dir={run}", f"paths.data_dir={data_dir}", *TINY_DATA, *TINY_MODEL, *QUIET,
               *overrides, cwd=tmp_path)
    assert not (run / "summary.json").exists()
    return proc, run


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["model=gpt2-foo"], ["model/gpt2-foo", "gpt2-nano"]),  # unknown group option: lists the choices
        (["selection=nope"], ["selection/nope", "clm"]),
        (["model.foo=1"], ["model.foo", "+model.foo"]),  # unknown key: says how to add one
        (["optim.lr=-1"], ["optim.lr=-1", "> 0"]),
        (["optim.lr=0"], ["optim.lr=0"]),
        (["data.batch_size=0"], ["data.batch_size=0", "positive"]),
        (["model.n_embd=65"], ["model.n_embd", "n_head"]),
        (["model.block_size=1000000", "trainer.check_memory=false"], ["model.block_size", "larger corpus"]),
        (["model.block_size=1000000"], ["GiB per device", "model.block_size", "trainer.check_memory=false"]),
        (["model.vocab_size=100"], ["model.vocab_size=100", "tokenizer"]),
        (["data.val_fraction=1.5"], ["data.val_fraction"]),
        (["data=text", "data.path=/does/not/exist"], ["/does/not/exist", "data.path"]),
        (["trainer.selection_scope=everywhere"], ["trainer.selection_scope=everywhere", "micro_batch, global_batch"]),
        (["selection=hier_eslm", "trainer.selection_scope=global_batch"],
         ["selection=hier_eslm keeps windows per micro-batch", "trainer.selection_scope=micro_batch"]),
        (["selection=hier_eslm", "selection.exit_layer=9"], ["selection.exit_layer=9 exceeds model.n_layer=2"]),
        (["trainer.compile=maybe"], ["trainer.compile=maybe", "true or false"]),
        # GPU-only settings on this CPU-only machine: one line, before any work
        pytest.param(["trainer=gpu"], ["trainer.accelerator=gpu", "no CUDA GPU", "trainer=cpu"],
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
        pytest.param(["trainer=fsdp", "trainer.accelerator=gpu"], ["no CUDA GPU", "trainer.accelerator=cpu"],
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
        (["trainer.accelerator=cpu", "trainer.precision=16-mixed"], ["trainer.precision=16-mixed", "needs a GPU"]),
        (["hydra/launcher=slurm"], ["hydra/launcher=slurm", "add -m"]),
    ],
)
def test_bad_config_values(tiny_data: Path, tmp_path: Path, overrides: list[str], words: list[str]) -> None:
    proc, run = bad_train(tmp_path, tiny_data, *overrides)
    fails(proc, *words)
    assert not run.exists()  # a run that never started leaves no run dir behind


def test_full_error_shows_the_traceback(tiny_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = slm("train", f"hydra.run.dir={run}", f"paths.data_dir={tiny_data}", "optim.lr=-1", *TINY_DATA,
               cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "optim.lr=-1" in proc.stderr


def test_empty_corpus(tiny_data: Path, tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("\n   \n\n")
    proc, _ = bad_train(tmp_path, tmp_path / "data", "data=text", f"data.path={tmp_path}/empty.txt", "data.name=null")
    fails(proc, "no text")
    assert not (tmp_path / "data" / "empty" / "meta.json").exists()


@pytest.fixture
def data_copy(tiny_data: Path, tmp_path: Path) -> Path:
    """A private copy of the prepared tiny data that a test may damage."""
    copy = tmp_path / "data"
    shutil.copytree(tiny_data / "tiny", copy / "tiny")
    # Keep the source fingerprint valid: the copy describes the same stdlib slice.
    return copy


def test_corrupt_meta_json(data_copy: Path, tmp_path: Path) -> None:
    (data_copy / "tiny" / "meta.json").write_text('{"format_version": 1, "vocab')
    fails(bad_train(tmp_path, data_copy)[0], "corrupt meta.json", "slm prepare")


def test_meta_json_that_does_not_match_the_tokens(data_copy: Path, tmp_path: Path) -> None:
    meta_path = data_copy / "tiny" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["train_tokens"] += 1000
    meta_path.write_text(json.dumps(meta))
    fails(bad_train(tmp_path, data_copy)[0], "train.bin", "meta.json")


def test_corrupt_checkpoint(tiny_data: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    fails(bad_train(tmp_path, tiny_data, f"ckpt_path={bad}")[0], "bad.ckpt", "corrupt")
    fails(bad_train(tmp_path, tiny_data, f"ckpt_path={tmp_path}/missing.ckpt")[0], "does not exist")
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    fails(bad_train(tmp_path, tiny_data, f"ckpt_path={tmp_path}/foreign.ckpt")[0], "not written by")


def test_resume_with_another_model_or_tokenizer(tiny_data: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    ok(slm("train", f"hydra.run.dir={first}", f"paths.data_dir={tiny_data}", *TINY_DATA, *TINY_MODEL, *QUIET,
           "trainer.max_steps=2", cwd=tmp_path))
    ckpt = f"ckpt_path={first}/checkpoints/last.ckpt"
    fails(bad_train(tmp_path, tiny_data, ckpt, "model.n_layer=3")[0], "model.n_layer=3", "checkpoint: 2")
    # Same corpus, another tokenizer (vocabulary 600 instead of 512): the model cannot read it.
    proc, _ = bad_train(tmp_path, tiny_data, ckpt, "data.vocab_size=600", "data.name=tiny600")
    fails(proc, "vocab_size", "checkpoint")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data: Path, tmp_path: Path) -> None:
    # Warmup keeps the first steps sane; the learning rate then explodes the weights.
    proc, run = bad_train(tmp_path, tiny_data, "optim.lr=1e12", "optim.warmup_steps=3", "optim.grad_clip=0",
                          "trainer.checkpoint_every_n_steps=1", "trainer.max_steps=50")
    line = fails(proc, "became", "optim.lr", "last good checkpoint is")
    ckpt = torch.load(line.split("last good checkpoint is ")[1].strip(), weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_eval_errors(tiny_data: Path, tmp_path: Path) -> None:
    proc = slm("eval", f"paths.data_dir={tiny_data}", *TINY_DATA, f"ckpt_path={tmp_path}/nope.ckpt", cwd=tmp_path)
    fails(proc, "does not exist")
    proc = slm("eval", f"paths.data_dir={tiny_data}", *TINY_DATA, cwd=tmp_path)
    fails(proc, "ckpt_path")


# The settings that name a model or a run: an error about one names that one, with its fix.
MODEL_KEYS = ("init_from", "ckpt_path", "target.teacher", "selection.reference.ckpt_path", "reference", "run")


@pytest.mark.parametrize(
    ("command", "args", "key"),
    [
        ("train", ["init_from={missing}"], "init_from"),
        ("train", ["init_from={folder}"], "init_from"),  # a folder that holds no model
        ("train", ["init_from={corrupt}"], "init_from"),
        ("train", ["selection=rho1", "selection.reference.mode=online", "selection.reference.ckpt_path={missing}"],
         "selection.reference.ckpt_path"),
        ("train", ["selection=eslm", "target=kd", "target.teacher={missing}"], "target.teacher"),
        ("eval", ["ckpt_path={missing}"], "ckpt_path"),
        ("sample", ["ckpt_path={missing}"], "ckpt_path"),
        ("export", ["ckpt_path={missing}", "out={folder}/out"], "ckpt_path"),
        ("tokens", ["ckpt_path={run}", "text=a b", "reference={missing}"], "reference"),
        ("tokens", ["ckpt_path={run}", "text=a b", "selection=rho1", "selection.reference.ckpt_path={missing}"],
         "selection.reference.ckpt_path"),
        ("dynamics", ["run={missing}"], "run"),
    ],
)
def test_errors_name_the_setting_the_user_gave(command: str, args: list[str], key: str, tiny_data: Path,
                                               checkpointed_run: Path, tmp_path: Path) -> None:
    """`slm train init_from=<missing>` names init_from and its fix (not ckpt_path, which would
    resume a run instead); likewise every setting that names a model or a run."""
    (tmp_path / "corrupt.ckpt").write_bytes(b"not a checkpoint")
    (tmp_path / "folder").mkdir()
    paths = {"missing": tmp_path / "missing.ckpt", "folder": tmp_path / "folder", "corrupt": tmp_path / "corrupt.ckpt",
             "run": checkpointed_run}
    args = [arg.format(**paths) for arg in args]
    if command == "train":
        proc, run = bad_train(tmp_path, tiny_data, "trainer.max_steps=1", *args)
        assert not run.exists()
    else:
        proc = slm(command, *args, cwd=tmp_path)
    value = next(arg.split("=", 1)[1] for arg in args if arg.startswith(f"{key}="))
    named = (f"{key}: checkpoint {value}", f"pass another {key}") if "corrupt" in value else (f"{key}={value}",
                                                                                               f"pass {key}=")
    line = fails(proc, *named)
    for other in set(MODEL_KEYS) - {key}:
        assert not re.search(rf"(?<![\w.]){re.escape(other)}=", line), (other, line)


def test_a_run_dir_that_resumes_itself_is_named_not_ckpt_path(tiny_data: Path, checkpointed_run: Path,
                                                                tmp_path: Path) -> None:
    """Without ckpt_path, a run dir holding checkpoints/last.ckpt resumes from it. A model that does
    not match that checkpoint is refused naming hydra.run.dir (what the user gave) and the fix of
    another run dir, not ckpt_path; a corrupt last.ckpt likewise. The run dir is left as it was."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(checkpointed_run, run)
    before = sorted(p.relative_to(run) for p in run.rglob("*") if ".hydra" not in p.parts)
    proc = slm("train", f"hydra.run.dir={run}", f"paths.data_dir={tiny_data}", *TINY_DATA, *TINY_MODEL, *QUIET,
               "model.n_layer=3", "trainer.max_steps=30", cwd=tmp_path)
    line = fails(proc, f"hydra.run.dir={run}", "model.n_layer=3 (checkpoint: 2)", "another hydra.run.dir")
    assert "ckpt_path" not in line
    (run / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    proc = slm("train", f"hydra.run.dir={run}", f"paths.data_dir={tiny_data}", *TINY_DATA, *TINY_MODEL, *QUIET,
               "trainer.max_steps=30", cwd=tmp_path)
    line = fails(proc, "hydra.run.dir: checkpoint", "is corrupt")
    assert "ckpt_path" not in line
    assert sorted(p.relative_to(run) for p in run.rglob("*") if ".hydra" not in p.parts) == before
