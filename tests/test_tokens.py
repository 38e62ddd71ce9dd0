"""`slm tokens`: the page, rendered by a real browser (headless Chromium), shows one element per
token whose text is the text and whose values equal an independent float64 computation, and it
marks exactly the tokens an independent top-k picks. Bad input fails in one line."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import float64_token_stats, ok, slm

CHROMIUM = Path("/usr/bin/chromium")
TEXT = "def add(x, y):\n    return x + y\n\n\nclass A:\n\tpass\n"  # 30 of the 32 tokens of context


def chromium(page: Path, tmp: Path) -> tuple[str, Path]:
    """The DOM after the page loaded (--dump-dom) and a PNG screenshot of it."""
    if not CHROMIUM.exists():
        pytest.skip("headless Chromium is not installed (/usr/bin/chromium): apt-get install -y chromium")
    profile = tmp / "chromium-profile"
    flags = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
             "--hide-scrollbars", "--window-size=1000,700"]
    url = page.resolve().as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
    png = tmp / (page.stem + ".png")
    subprocess.run([*flags, f"--screenshot={png}", url], capture_output=True, timeout=120, check=True)
    shutil.rmtree(profile, ignore_errors=True)
    return dom, png


class Tokens(HTMLParser):
    """The token spans of a DOM: their attributes and their text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.spans: list[dict[str, str]] = []
        self.texts: list[str] = []
        self._depth = 0  # > 0 inside a token span

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "span" and "tok" in a.get("class", "").split():
            self.spans.append(a)
            self.texts.append("")
            self._depth = 1
        elif self._depth:
            self._depth += 1

    def handle_endtag(self, tag: str) -> None:
        if self._depth:
            self._depth -= 1

    def handle_data(self, data: str) -> None:
        if self._depth:
            self.texts[-1] += data


def parse(dom: str) -> Tokens:
    parser = Tokens()
    parser.feed(dom)
    return parser


def not_blank(png: Path) -> None:
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64)
    assert pixels.std() > 20, f"{png} looks blank (pixel std {pixels.std():.1f})"
    # The colour scale is there: many distinct colours, not only text on white.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50


def top_k(values: np.ndarray, k: int) -> np.ndarray:
    mask = np.zeros(len(values), dtype=bool)
    mask[np.argsort(-values, kind="stable")[:k]] = True
    return mask


def assert_marks(marked: np.ndarray, values: np.ndarray, ratio: float) -> None:
    """``marked`` are the ⌈ratio·n⌉ highest ``values``; a disagreement is allowed only between
    tokens whose values tie with the k-th to float32 precision (the page ranks float32 values)."""
    k = max(1, math.ceil(ratio * len(values) - 1e-9))
    assert marked.sum() == k
    expect = top_k(values, k)
    kth = np.sort(values)[::-1][k - 1]
    assert np.all(np.abs(values[marked != expect] - kth) < 1e-5), "selected tokens differ from the top-k"


def tokenizer_and_eos(ckpt: Path):  # type: ignore[no-untyped-def]
    import torch
    from tokenizers import Tokenizer

    entry = torch.load(ckpt, map_location="cpu", weights_only=True)["slm"]
    tok = Tokenizer.from_str(entry["tokenizer_json"])
    return tok, tok.token_to_id("<|endoftext|>")


def test_text_page_in_the_browser(checkpointed_run: Path, tmp_path: Path) -> None:
    """value=loss, selection=eslm (alpha 0.4: keeps the 60% highest-loss tokens; the run trained with
    CLM, so the command line names the strategy) on a short text."""
    ckpt = checkpointed_run / "checkpoints" / "last.ckpt"
    out = tmp_path / "page.html"
    ok(slm("tokens", f"ckpt_path={ckpt}", f"text={TEXT}", "value=loss", "selection=eslm", f"out={out}", cwd=tmp_path))
    page = out.read_text()
    assert "http://" not in page and "https://" not in page and "src=\"//" not in page  # no request of its own
    dom, png = chromium(out, tmp_path)
    not_blank(png)
    found = parse(dom)

    tok, eos = tokenizer_and_eos(ckpt)
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    assert len(found.spans) == len(ids)
    assert "".join(found.texts) == TEXT  # spaces, tabs and newlines kept; pieces concatenate to the text
    assert [int(s["data-token-id"]) for s in found.spans] == ids
    window = [eos, *ids]
    loss, entropy = float64_token_stats(ckpt, [window[:-1]], [window[1:]])
    page_loss = np.array([float(s["data-loss"]) for s in found.spans])
    page_entropy = np.array([float(s["data-entropy"]) for s in found.spans])
    np.testing.assert_allclose(page_loss, loss[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(page_entropy, entropy[0], atol=1e-4, rtol=0)
    marked = np.array([s["data-selected"] == "1" for s in found.spans])
    assert marked.tolist() == ["sel" in s["class"].split() for s in found.spans]
    assert_marks(marked, loss[0], ratio=1 - 0.4)
    # Each token's colour follows its loss: the highest loss is drawn darker than the lowest.
    styles = [s["style"] for s in found.spans]
    assert styles[int(np.argmax(loss[0]))] != styles[int(np.argmin(loss[0]))]


def test_rho1_excess_on_a_corpus_window(checkpointed_run: Path, tiny_data: Path, tmp_path: Path) -> None:
    """selection=rho1 with a reference (an earlier checkpoint of the same run) on val window 2:
    the page's tokens are val.bin's, its excess losses the float64 difference, its marks the top
    60% by excess."""
    ckpt = checkpointed_run / "checkpoints" / "last.ckpt"
    ref = checkpointed_run / "checkpoints" / "step0000010.ckpt"
    out = tmp_path / "rho1.html"
    from tests.helpers import TINY_DATA

    ok(slm("tokens", f"ckpt_path={ckpt}", f"paths.data_dir={tiny_data}", *TINY_DATA, "split=val", "window=2",
           "selection=rho1", f"selection.reference.ckpt_path={ref}", "value=excess", f"out={out}", cwd=tmp_path))
    dom, png = chromium(out, tmp_path)
    not_blank(png)
    found = parse(dom)

    meta = json.loads((tiny_data / "tiny" / "meta.json").read_text())
    val = np.memmap(tiny_data / "tiny" / "val.bin", dtype=meta["dtype"], mode="r").astype(np.int64)
    T = 32
    window = val[2 * T: 3 * T + 1]
    assert [int(s["data-token-id"]) for s in found.spans] == window[1:].tolist()
    loss, _ = float64_token_stats(ckpt, [window[:-1]], [window[1:]])
    ref_loss, ref_entropy = float64_token_stats(ref, [window[:-1]], [window[1:]])
    excess = loss[0] - ref_loss[0]
    get = lambda key: np.array([float(s[key]) for s in found.spans])  # noqa: E731
    np.testing.assert_allclose(get("data-loss"), loss[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(get("data-reference-loss"), ref_loss[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(get("data-reference-entropy"), ref_entropy[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(get("data-excess"), excess, atol=1e-4, rtol=0)
    assert_marks(np.array([s["data-selected"] == "1" for s in found.spans]), excess, ratio=0.6)
    tok, _ = tokenizer_and_eos(ckpt)
    assert "".join(found.texts) == tok.decode(window[1:].tolist(), skip_special_tokens=False)


def test_bad_input_is_one_line(checkpointed_run: Path, tmp_path: Path) -> None:
    ckpt = checkpointed_run / "checkpoints" / "last.ckpt"
    long_text = "x = 1\n" * 40  # far more than the 32-token context
    proc = slm("tokens", f"ckpt_path={ckpt}", f"text={long_text}", cwd=tmp_path)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "context is 32 tokens" in proc.stderr and "shorten" in proc.stderr
    proc = slm("tokens", f"ckpt_path={ckpt}", "text=a b c", "value=excess", cwd=tmp_path)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "needs a reference model" in proc.stderr and "reference=" in proc.stderr
    assert not (tmp_path / "tokens.html").exists()


def test_quote_text_round_trips() -> None:
    """`text=` reaches the config literally, whatever Hydra syntax it holds."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from slm_cli.arguments import quote_text

    parser = OverridesParser.create()
    for text in [TEXT, "it's \\ a \\' test \\", "f(${HOME}, [1, 2]) = {a: b}", "", "x='y'"]:
        (arg,) = quote_text([f"text={text}"])
        value = parser.parse_override(arg).value()
        assert OmegaConf.create({"text": value}).text == text
