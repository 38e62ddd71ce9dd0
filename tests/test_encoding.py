"""data.encoding_errors: corpus files that are not valid UTF-8.

References are Python's own whole-buffer ``bytes.decode`` (and ``json.loads``), independent of the
chunked check and of `datasets`' builders that slm_cli uses.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, OmegaConf
from tokenizers import Tokenizer

from slm_cli.config import check_data
from slm_cli.data import sources
from slm_cli.data.prepare import prepare
from slm_cli.data.sources import first_invalid_utf8, load_documents, source_fingerprint
from slm_cli.errors import SlmError
from tests.helpers import slm
from tests.test_data import files_cfg, split_docs, stream

# A valid two-byte character first, so that the byte offset (10) and the character offset (9) differ.
PREFIX = "naïve ".encode()
BAD = PREFIX + b"caf\xe9 ok\nsecond line\n"
BAD_OFFSET = len(PREFIX) + 3
GOOD = b"first file, all fine\n"


@pytest.fixture
def paths(tmp_path: Path) -> DictConfig:
    return OmegaConf.create({"data_dir": str(tmp_path / "data")})


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_bytes(GOOD)
    (folder / "b.txt").write_bytes(BAD)
    return folder


def reference_docs(files: list[Path], errors: str) -> list[str]:
    """One document per file (sample_by=document), decoded by Python in one go."""
    return [f.read_bytes().decode("utf-8", errors=errors) for f in sorted(files)]


def prepared_docs(data) -> list[str]:
    tok = Tokenizer.from_file(str(data.tokenizer_path))
    return split_docs(stream(data), data.eos_id, tok)


def test_strict_names_the_file_and_the_byte(corpus: Path, paths: DictConfig) -> None:
    with pytest.raises(SlmError) as err:
        prepare(files_cfg(corpus, sample_by="document"), paths)
    message = str(err.value)
    assert "\n" not in message
    assert f"{corpus / 'b.txt'} is not valid UTF-8 at byte {BAD_OFFSET} (0xe9)" in message
    assert "data.encoding_errors=replace" in message
    assert BAD[BAD_OFFSET] == 0xE9 and not (Path(paths.data_dir) / "corpus" / "meta.json").exists()


def test_strict_from_the_command_line(corpus: Path, tmp_path: Path) -> None:
    proc = slm("prepare", "data=text", f"data.path={corpus}", f"paths.data_dir={tmp_path / 'data'}", cwd=tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"{corpus / 'b.txt'} is not valid UTF-8 at byte {BAD_OFFSET}" in lines[0]
    assert "data.encoding_errors=replace" in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.parametrize("errors", ["replace", "ignore"])
def test_replace_and_ignore_prepare(corpus: Path, paths: DictConfig, errors: str) -> None:
    cfg = files_cfg(corpus, sample_by="document", encoding_errors=errors, name=f"corpus-{errors}")
    expected = reference_docs(list(corpus.iterdir()), errors)
    assert expected[1].startswith("naïve caf\ufffd ok" if errors == "replace" else "naïve caf ok")
    data = prepare(cfg, paths)
    assert prepared_docs(data) == expected
    assert data.meta["settings"]["encoding_errors"] == errors


@pytest.mark.parametrize("errors", ["strict", "replace", "ignore"])
def test_jsonl(tmp_path: Path, paths: DictConfig, errors: str) -> None:
    path = tmp_path / "docs.jsonl"
    raw = b'{"text": "' + PREFIX + b'caf\xe9 ok"}\n{"text": "second"}\n'
    path.write_bytes(raw)
    cfg = files_cfg(path, encoding_errors=errors)
    if errors == "strict":
        offset = raw.index(b"\xe9")
        with pytest.raises(SlmError, match=rf"docs.jsonl is not valid UTF-8 at byte {offset} "):
            load_documents(cfg, tmp_path / "cache")
        return
    expected = [json.loads(line)["text"] for line in raw.decode("utf-8", errors=errors).splitlines()]
    assert ("\ufffd" in expected[0]) == (errors == "replace")
    assert load_documents(cfg, tmp_path / "cache")["text"] == expected


def test_first_invalid_utf8_matches_a_whole_buffer_decode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny chunks put multi-byte sequences across chunk boundaries and truncate them at the end."""
    pieces = [b"a", b"z ", "é".encode(), "€".encode(), "😀".encode(), b"\xff", b"\x80", b"\xe2\x82", b"\xf0\x9f",
              b"\xc3", b"\xed\xa0\x80"]  # the last: a UTF-16 surrogate, invalid in UTF-8
    rng = random.Random(0)
    path = tmp_path / "f.txt"
    for case in range(400):
        valid_only = case % 3 == 0
        choices = pieces[:5] if valid_only else pieces
        data = b"".join(rng.choice(choices) for _ in range(rng.randrange(0, 12)))
        try:
            data.decode("utf-8")
            expected = None
        except UnicodeDecodeError as e:
            expected = e.start
        path.write_bytes(data)
        monkeypatch.setattr(sources, "UTF8_CHECK_CHUNK", rng.randrange(1, 6))
        assert first_invalid_utf8(path) == expected, (data, sources.UTF8_CHECK_CHUNK)


def test_the_setting_is_part_of_the_fingerprint(corpus: Path) -> None:
    fingerprints = {e: source_fingerprint(files_cfg(corpus, encoding_errors=e)) for e in ("strict", "replace", "ignore")}
    assert len(set(fingerprints.values())) == 3
    # Data prepared before the key existed (read strictly, the only way it loaded) stays valid.
    old = files_cfg(corpus)
    del old["encoding_errors"]
    assert source_fingerprint(old) == fingerprints["strict"]


def test_the_value_is_checked(corpus: Path) -> None:
    with pytest.raises(SlmError, match="data.encoding_errors=lenient is unknown: use one of strict, replace, ignore"):
        check_data(files_cfg(corpus, encoding_errors="lenient"))


def test_every_data_config_inherits_strict() -> None:
    options = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "data").glob("*.yaml"))
    assert len(options) >= 6
    with initialize_config_module(config_module="slm_cli.conf", version_base="1.3"):
        for option in options:
            cfg = compose("prepare", overrides=[f"data={option}", "data.path=x.txt"])
            assert cfg.data.encoding_errors == "strict", option
    assert sources.encoding_errors(OmegaConf.create({"source": "stdlib", "encoding_errors": "strict"})) == "replace"
    assert sources.encoding_errors(OmegaConf.create({"source": "hub"})) is None
