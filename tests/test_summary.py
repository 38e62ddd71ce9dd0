"""summary.json's schema (slm_cli/summary.py): one key per figure, written atomically and read back,
older runs' key names read in its one place, and docs/outputs.md listing the same keys."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest

from slm_cli.summary import RunSummary, read
from tests.helpers import earlier_summary

ROOT = Path(__file__).resolve().parents[1]
COUNTERS = {"train_tokens": 4096.0, "forward_tokens": 3072.0, "selected_tokens": 2458.0, "flops_realized": 9.0e9, "flops_nominal": 7.5e9,
            "flops_clm": 1.0e10}


def full() -> RunSummary:
    return RunSummary.from_run(
        COUNTERS, 5.0e8, steps=8, val_loss=4.5, val_ppl=math.exp(4.5), val_sources={"wiki": 4.4, "noise": 6.0},
        train_tokens_per_s=1234.5, wall_s=12.0, selection="eslm", target="onehot", model="gpt2-nano", params=123456,
        data="/data/tiny", checkpoint="/run/checkpoints/last.ckpt")


def test_from_run_derives_the_saved_fractions() -> None:
    s = full()
    assert (s.train_tokens, s.forward_tokens, s.selected_tokens) == (4096, 3072, 2458)
    assert isinstance(s.train_tokens, int) and isinstance(s.forward_tokens, int)
    assert s.flops_saved_frac_realized == pytest.approx(1 - 9.0e9 / 1.0e10)
    assert s.flops_saved_frac_nominal == pytest.approx(1 - 7.5e9 / 1.0e10)
    assert s.flops_saved_frac_nominal_incl_scoring == pytest.approx(1 - (7.5e9 + 5.0e8) / 1.0e10)


def test_written_with_one_key_per_figure_and_read_back(tmp_path: Path) -> None:
    s = full()
    path = s.write(tmp_path)
    data = json.loads(path.read_text())
    assert path.name == "summary.json" and list(data) == [f.name for f in dataclasses.fields(RunSummary)]
    assert None not in data.values() and not list(tmp_path.glob("*.tmp"))
    # the realised accounting leads, the nominal one beside it
    keys = list(data)
    assert keys.index("flops_realized") < keys.index("flops_saved_frac_realized") < keys.index("flops_nominal")
    assert read(tmp_path) == s == read(path)


def test_earlier_keys_read_under_todays() -> None:
    today = full().to_dict()
    old = earlier_summary(today)
    assert {"flops_total", "flops_clm_equivalent", "flops_saved_frac"} <= set(old)
    assert not {"flops_realized", "flops_clm", "flops_nominal", "flops_saved_frac_realized"} & set(old)
    s = RunSummary.from_dict(old)
    assert s.flops_realized == 9.0e9 and s.flops_clm == 1.0e10
    assert s.flops_saved_frac_nominal == pytest.approx(0.25)
    assert s.flops_nominal == pytest.approx(7.5e9, rel=1e-12)  # clm × (1 − nominal saved fraction)
    assert s.flops_saved_frac_realized == pytest.approx(0.1, rel=1e-12)
    assert s.val_sources is None and s.target is None  # not in the oldest summaries: absent, not guessed
    assert s.forward_tokens == s.train_tokens == 4096  # every token drawn ran forward before instance selection
    # today's key wins over an earlier one
    assert RunSummary.from_dict({**old, "flops_realized": 8.0e9}).flops_realized == 8.0e9


def test_values_of_the_wrong_type_are_left_out() -> None:
    s = RunSummary.from_dict({"steps": True, "val_loss": "nan", "selection": 3, "val_sources": {"a": 1.5, "b": "x"},
                              "unknown": 1.0, "flops_clm": 0.0, "flops_realized": 0.0})
    assert s.steps is None and s.val_loss is None and s.val_ppl is None and s.selection is None
    assert s.val_sources == {"a": 1.5}
    assert s.flops_saved_frac_realized is None  # no CLM FLOPs to be a fraction of


def test_unreadable_summaries_raise(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        read(tmp_path)
    (tmp_path / "summary.json").write_text("{")
    with pytest.raises(ValueError):
        read(tmp_path)
    with pytest.raises(OSError):
        read(tmp_path / "missing")


def test_every_field_has_a_doc_and_docs_outputs_lists_them() -> None:
    """docs/outputs.md's summary.json table names each key of the schema once, and no other."""
    names = [f.name for f in dataclasses.fields(RunSummary)]
    assert all(f.metadata["doc"] for f in dataclasses.fields(RunSummary))
    doc = (ROOT / "docs" / "outputs.md").read_text()
    section = doc[doc.index("## summary.json"):]
    section = section[: section.index("\n## ", 1)]
    listed = [key for line in section.splitlines() if line.startswith("| `")
              for key in re.findall(r"`(\w+)`", line.split("|")[1])]
    assert sorted(listed) == sorted(names)
