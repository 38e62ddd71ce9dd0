"""Data mixtures (`data=mix`): the folder, the sampler's allocation and spans, device-count and resume
invariance, per-source validation against `slm eval` on each source alone, RHO-1 over a mixture,
and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from slm_cli.data.windows import StepSampler, TrainWindows, ValWindows, draw_sources, mixture_starts
from tests.helpers import TINY_MODEL, ok, slm

# Two vendored corpora, capped so that preparing both takes seconds; one BPE over their union.
MIX = ["data=mix", "data.max_bytes=150000", "data.vocab_size=512", "data.batch_size=4"]
QUIET = ["trainer.enable_progress_bar=false", "optim.warmup_steps=1", "optim.decay_steps=4"]
# Every val window of both sources (a few hundred), so the per-source loss is over the whole split, as `slm eval`'s.
FULL_VAL = "trainer.limit_val_batches=1000"


def brute_force_sources(seed: int, indices: range, weights: list[float]) -> list[int]:
    """draw_sources in Python integers: the golden-ratio Weyl point of each index against the
    cumulative weights (an independent implementation of the documented rule)."""
    def mix64(x: int) -> int:
        m = 2**64 - 1
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
        return x ^ (x >> 31)

    key = mix64((seed ^ 0x5EED50C5) & (2**64 - 1))
    total = sum(weights)
    edges = [sum(weights[: s + 1]) / total for s in range(len(weights))]
    out = []
    for i in indices:
        u = (((key + i * 0x9E3779B97F4A7C15) % 2**64) >> 11) / 2**53
        out.append(min(next((s for s, e in enumerate(edges) if u < e), len(weights) - 1), len(weights) - 1))
    return out


def test_allocation_matches_the_weights() -> None:
    weights = [0.5, 0.3, 0.2]
    n = 30_000
    source = draw_sources(7, np.arange(n), weights)
    assert source.tolist()[:3000] == brute_force_sources(7, range(3000), weights)
    counts = np.bincount(source, minlength=3)
    for count, w in zip(counts, weights, strict=True):
        # Independent draws would land within 4 binomial sd; the low-discrepancy draw does far better.
        assert abs(count - n * w) <= 4 * math.sqrt(n * w * (1 - w)), counts
    # Every step's global batch (G = 16 windows) is close to its quota: |count - G·w| < 3.
    per_step = np.stack([np.bincount(s, minlength=3) for s in source.reshape(-1, 16)])
    assert np.abs(per_step - 16 * np.array(weights)).max() < 3
    assert (draw_sources(8, np.arange(n), weights) != source).any()  # the seed matters


def _stream(sizes: list[int]) -> tuple[np.ndarray, list[tuple[str, int, int]]]:
    """A stream whose every token is its source's index: a window crossing a span shows two values."""
    tokens = np.concatenate([np.full(n, s, dtype=np.uint16) for s, n in enumerate(sizes)])
    ends = np.cumsum(sizes).tolist()
    return tokens, [(f"s{s}", a, b) for s, (a, b) in enumerate(zip([0, *ends[:-1]], ends, strict=True))]


@pytest.mark.parametrize("grid", [None, 24])
def test_windows_stay_inside_their_source(grid: int | None) -> None:
    """Each window lies inside the span of the source drawn for its index (on RHO-1's grid: at
    multiples of the grid whose whole grid window fits in the span)."""
    block = 16
    tokens, spans = _stream([1001, 97, 450])
    weights = [1.0, 2.0, 1.0]
    ds = TrainWindows(tokens, block, seed=3, grid=grid, spans=spans, weights=weights)
    idx = np.arange(4000)
    batch = ds[idx]
    window = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], 1).numpy()
    expected = draw_sources(3, idx, weights)
    assert (window == expected[:, None]).all()  # one source per window, the drawn one
    starts = mixture_starts(3, idx, spans, weights, block, grid)
    assert (batch["positions"][:, 0].numpy() == starts + 1).all()
    for s, (_, a, b) in enumerate(spans):
        mine = starts[expected == s]
        assert mine.min() >= a and mine.max() + block <= b - 1
        if grid is not None:
            assert (mine % grid == 0).all() and (mine + grid <= b - 1).all()
        else:  # the draw reaches both ends of the span
            assert len(set(mine.tolist())) > min(b - a - block, 200) // 2


def test_global_batch_does_not_depend_on_devices() -> None:
    tokens, spans = _stream([5000, 3000])
    ds = TrainWindows(tokens, 8, seed=1, spans=spans, weights=[0.6, 0.4])
    one = iter(StepSampler(8, start_step=0))
    two = [iter(StepSampler(4, start_step=0, rank=r, world_size=2)) for r in range(2)]
    for _ in range(5):
        whole = ds[next(one)]["positions"]
        split = torch.cat([ds[next(it)]["positions"] for it in two])
        assert torch.equal(whole, split)


def test_val_windows_per_source() -> None:
    tokens, spans = _stream([100, 45, 70])
    val = ValWindows(tokens, 8, spans=spans, max_windows=10)
    expected = [min((b - a - 1) // 8, 10) for _, a, b in spans]  # 10 (capped), 5, 8
    assert len(val) == sum(expected)
    items = [val[k] for k in range(len(val))]
    sources = [int(item["source"]) for item in items]
    assert sources == [s for s, n in enumerate(expected) for _ in range(n)]
    for item in items:  # inside its own span, consecutive from the span's start
        assert (item["input_ids"] == item["source"]).all() and (item["labels"] == item["source"]).all()
    assert int(items[10]["positions"][0]) == spans[1][1] + 1


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mixture prepared once; returns its data dir."""
    data_dir = tmp_path_factory.mktemp("mixdata")
    ok(slm("prepare", f"paths.data_dir={data_dir}", *MIX, cwd=data_dir))
    return data_dir


def _train(run: Path, data_dir: Path, *overrides: str) -> dict:
    ok(slm("train", f"hydra.run.dir={run}", f"paths.data_dir={data_dir}", *MIX, *TINY_MODEL, *QUIET, *overrides,
           cwd=data_dir))
    return json.loads((run / "summary.json").read_text())


def test_the_folder_concatenates_its_sources(mixed: Path) -> None:
    meta = json.loads((mixed / "mix" / "meta.json").read_text())
    assert [m["name"] for m in meta["mixture"]] == ["wiki", "shakespeare"]
    for split in ("train", "val"):
        stream = np.fromfile(mixed / "mix" / f"{split}.bin", dtype=meta["dtype"])
        for m in meta["mixture"]:
            source = np.fromfile(Path(m["dir"]) / f"{split}.bin", dtype=meta["dtype"])
            a, b = m[split]
            assert np.array_equal(stream[a:b], source)
        assert meta["mixture"][-1][split][1] == len(stream)
    # A new weight keeps the tokens (and anything computed over them): only meta.json's weight changes.
    # (In-process; the other tests' runs pass their own weights, which prepare writes back.)
    from omegaconf import OmegaConf

    import slm_cli.commands  # noqa: F401  (registers ${corpus:...})
    from slm_cli.data.mixture import load_data_config
    from slm_cli.data.prepare import prepare

    cfg = OmegaConf.merge(load_data_config("mix"), {"max_bytes": 150000, "vocab_size": 512})
    cfg.sources.wiki.weight = 2
    prepared = prepare(cfg, OmegaConf.create({"data_dir": str(mixed)}))
    again = json.loads((mixed / "mix" / "meta.json").read_text())
    assert again["fingerprint"] == meta["fingerprint"] and again["created"] == meta["created"]
    assert [m["weight"] for m in again["mixture"]] == prepared.source_weights == [2, 0.3]


def test_resume_and_per_source_validation(mixed: Path, tmp_path: Path) -> None:
    """4 steps == 2 + 2 resumed; val/<source>/loss equals `slm eval` of the checkpoint on that source alone."""
    whole = _train(tmp_path / "whole", mixed, "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=2", FULL_VAL)
    resumed = _train(tmp_path / "resumed", mixed, "trainer.max_steps=4", FULL_VAL,
                     f"ckpt_path={tmp_path}/whole/checkpoints/step0000002.ckpt")
    assert resumed["steps"] == 4
    a = torch.load(tmp_path / "whole/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "resumed/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=0, atol=0)
    assert set(whole["val_sources"]) == {"wiki", "shakespeare"}
    metrics = (tmp_path / "whole" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/wiki/loss", "val/shakespeare/loss", "val/loss"} <= set(metrics)
    tokens = {}
    tokenizer = mixed / "mix" / "tokenizer.json"
    for name, data in (("wiki", "wikitext2"), ("shakespeare", "tinyshakespeare")):
        out = tmp_path / f"eval-{name}.json"
        ok(slm("eval", f"ckpt_path={tmp_path}/whole/checkpoints/last.ckpt", f"data={data}", "data.max_bytes=150000",
               f"data.tokenizer={tokenizer}", f"paths.data_dir={mixed}", f"out={out}", cwd=tmp_path))
        result = json.loads(out.read_text())
        assert abs(result["loss"] - whole["val_sources"][name]) < 1e-5, (name, result, whole["val_sources"])
        tokens[name] = result["tokens"]
    # The overall loss is the token-weighted mean of the sources'.
    mean = sum(whole["val_sources"][n] * t for n, t in tokens.items()) / sum(tokens.values())
    assert abs(whole["val_loss"] - mean) < 1e-5


def test_two_devices_train_and_validate_like_one(mixed: Path, tmp_path: Path) -> None:
    """DDP on 2 CPU ranks (2 windows each) == 1 device (4 windows): the same parameters and per-source
    losses, with an odd number of val windows (237), so one rank evaluates a padding window."""
    from tests.test_distributed import CPU_DDP, max_diff, params

    one = _train(tmp_path / "one", mixed, "trainer.max_steps=2", FULL_VAL)
    two = _train(tmp_path / "two", mixed, "trainer.max_steps=2", FULL_VAL, *CPU_DDP, "data.batch_size=2")
    assert max_diff(params(tmp_path / "one"), params(tmp_path / "two")) < 1e-5
    assert one["val_sources"].keys() == two["val_sources"].keys()
    for name, loss in one["val_sources"].items():
        assert two["val_sources"][name] == pytest.approx(loss, abs=1e-6)


def test_rho1_over_a_mixture(mixed: Path, tmp_path: Path) -> None:
    """Reference on one source, scores over the mixture, RHO-1 training on it, evaluated per source."""
    ref = tmp_path / "ref"
    ok(slm("train", f"hydra.run.dir={ref}", f"paths.data_dir={mixed}", "data=wikitext2", "data.max_bytes=150000",
           "data.vocab_size=512", "data.batch_size=4", *TINY_MODEL, *QUIET, "trainer.max_steps=2",
           "trainer.limit_val_batches=1", cwd=tmp_path))
    ckpt = f"{ref}/checkpoints/last.ckpt"
    ok(slm("score", f"paths.data_dir={mixed}", *MIX, f"ckpt_path={ckpt}", "name=ref", cwd=tmp_path))
    summary = _train(tmp_path / "rho1", mixed, "selection=rho1", f"data.tokenizer={ckpt}", "trainer.max_steps=2",
                     "trainer.limit_val_batches=1")
    assert 0 < summary["selected_tokens"] < summary["train_tokens"]
    assert set(summary["val_sources"]) == {"wiki", "shakespeare"}
    assert ".tok-" in summary["data"] and (Path(summary["data"]) / "ref-ref" / "meta.json").is_file()


def test_bad_sources(tmp_path: Path) -> None:
    """Each bad source is one line naming the key and the fix (the CLI path once, the rest directly)."""
    from omegaconf import OmegaConf

    from slm_cli.data.mixture import load_data_config, sources
    from slm_cli.data.sources import source_name
    from slm_cli.errors import SlmError
    from tests.test_errors import fails

    fails(slm("prepare", f"paths.data_dir={tmp_path}", *MIX, "data.sources.wiki.data=wikitex2", cwd=tmp_path),
          "data.sources.wiki.data=wikitex2", "does not exist", "tinyshakespeare, ")
    base = load_data_config("mix")
    cases = {
        "data.sources.wiki.weight=0 must be a positive number": {"wiki": {"data": "wikitext2", "weight": 0}},
        "data.sources.b.weight=-1 must be a positive number": {"a": {"data": "stdlib", "weight": 1},
                                                             "b": {"data": "stdlib", "weight": -1}},
        "data.sources.a.weight=x must be a positive number": {"a": {"data": "stdlib", "weight": "x"}},
        "data.sources.a.weight=None must be a positive number": {"a": {"data": "stdlib"}},
        "data.sources is empty": {},
        "data.sources.a.data=mix: a mixture cannot contain a mixture": {"a": {"data": "mix", "weight": 1}},
        "data.sources.a sets pth, which data=text does not have": {"a": {"data": "text", "weight": 1, "pth": "x"}},
        "sources a and b would both be prepared into stdlib/": {"a": {"data": "stdlib", "weight": 1},
                                                                "b": {"data": "stdlib", "weight": 1}},
    }
    for message, value in cases.items():
        cfg = OmegaConf.merge(base, {"sources": None})
        cfg.sources = value
        with pytest.raises(SlmError, match="^" + message.replace(".", r"\.").replace("(", r"\(")):
            sources(cfg)
    cfg = OmegaConf.merge(base, {"sources": None})  # the fix above works: its own folder
    cfg.sources = {"a": {"data": "stdlib", "weight": 1}, "b": {"data": "stdlib", "weight": 1, "name": "stdlib-b"}}
    assert [source_name(s.cfg) for s in sources(cfg)] == ["stdlib", "stdlib-b"]
    cfg.sources = [{"name": "a", "data": "stdlib", "weight": 1}, {"name": "b", "data": "wikitext2", "weight": 3}]
    assert [(s.name, s.data, s.weight) for s in sources(cfg)] == [("a", "stdlib", 1.0), ("b", "wikitext2", 3.0)]
    cfg.sources = None
    with pytest.raises(SlmError, match="data.sources must map source names"):
        sources(cfg)

