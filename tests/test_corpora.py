"""The vendored corpora (`corpora/`, installed as `slm_cli.corpora`), the `${corpus:...}` resolver,
and the data configs that use it."""

from __future__ import annotations

import hashlib
import re
from importlib.resources import files
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

import slm_cli.commands  # noqa: F401  (registers ${corpus:...}, as every `slm` command does)
from slm_cli.config import check_data
from slm_cli.data.corpora import available, corpus_path
from slm_cli.errors import SlmError
from tests.helpers import ok, slm

CORPORA = ("tinyshakespeare/input.txt", "wikitext-2/test.txt", "wikitext-2/valid.txt")


def readme_checksums() -> dict[str, str]:
    """name -> sha256 from the `sha256sum`-format lines of the installed corpora/README.md."""
    text = (files("slm_cli.corpora") / "README.md").read_text(encoding="utf-8")
    return {name: digest for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+)$", text, re.M)}


def test_readme_lists_every_vendored_corpus() -> None:
    assert tuple(available()) == CORPORA
    assert sorted(readme_checksums()) == list(CORPORA)


@pytest.mark.parametrize("name", CORPORA)
def test_resolver_gives_the_vendored_file_from_any_cwd(name: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = Path(OmegaConf.create({"path": f"${{corpus:{name}}}"}).path)
    assert path.is_absolute() and path.is_file()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == readme_checksums()[name]


def test_wikitext_ships_its_licence() -> None:
    """CC BY-SA 3.0 asks for the licence (by name and URL), the authors and the source beside the text."""
    licence = (files("slm_cli.corpora") / "wikitext-2" / "LICENSE").read_text(encoding="utf-8")
    for words in ("CC BY-SA 3.0", "https://creativecommons.org/licenses/by-sa/3.0/", "Merity", "pytorch/examples"):
        assert words in licence


def test_unknown_corpus_is_one_line_naming_the_choices() -> None:
    with pytest.raises(SlmError) as err:
        corpus_path("wikitext-103/train.txt")
    message = str(err.value)
    assert "\n" not in message and "wikitext-103/train.txt" in message
    assert all(name in message for name in CORPORA)
    with pytest.raises(InterpolationResolutionError, match="unknown corpus 'nope.txt'.*wikitext-2/valid.txt"):
        _ = OmegaConf.create({"path": "${corpus:nope.txt}"}).path


@pytest.mark.parametrize("data,name,sample_by", [("wikitext2", "wikitext-2/valid.txt", "line"),
                                                 ("tinyshakespeare", "tinyshakespeare/input.txt", "paragraph")])
def test_data_configs_compose(data: str, name: str, sample_by: str) -> None:
    with initialize_config_module(config_module="slm_cli.conf", version_base="1.3"):
        cfg = compose("prepare", overrides=[f"data={data}"])
    assert cfg.data.name == data and cfg.data.source == "files" and cfg.data.sample_by == sample_by
    assert cfg.data.path == corpus_path(name)
    check_data(cfg.data)


def test_prepare_a_vendored_corpus_and_a_wrong_name(tmp_path: Path) -> None:
    """Through the CLI, from a directory that holds no corpus: the resolver is registered there too."""
    out = ok(slm("prepare", "data=wikitext2", f"paths.data_dir={tmp_path / 'data'}", "data.max_bytes=100000",
                 "data.vocab_size=512", cwd=tmp_path)).stdout
    assert "train_tokens=" in out and (tmp_path / "data" / "wikitext2" / "meta.json").is_file()
    proc = slm("prepare", "data=text", "data.path=${corpus:wikitext-2/train.txt}", f"paths.data_dir={tmp_path}",
               cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-2000:]
    assert "unknown corpus 'wikitext-2/train.txt'" in errors[0] and "wikitext-2/valid.txt" in errors[0]
