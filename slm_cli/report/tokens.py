"""`slm tokens`: one self-contained HTML page showing what a model and a selection strategy make of a
text, token by token (docs/report.md#slm-tokens).

Each token is drawn in the text with its background coloured by one per-token value: the model's
loss, its predictive entropy, a reference model's loss, or the excess loss ℓ − ℓ_ref that RHO-1
ranks by (arXiv 2404.07965). The tokens the strategy would keep are underlined: the real strategy,
built from conf/selection/*.yaml, whose ``features()`` and ``select()`` (slm_cli/selection/base.py)
run on the statistics of slm_cli/loss.py's ``model_token_stats`` (and the reference's own
``token_stats``), with the page's tokens as the whole batch. Hovering a token shows all of its values.

Given an slm run, the strategy and the corpus of ``split=`` are the run's own (slm_cli/run_settings.py)
unless the command line sets ``selection``/``data``: the page marks what the run's selection keeps.

This module computes the values; slm_cli/report/token_page.py draws the page.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from slm_cli.errors import SlmError
from slm_cli.loss import model_token_stats
from slm_cli.outputs import atomic_write
from slm_cli.report.token_page import LABELS, VALUES, TokenView, page, token_pieces
from slm_cli.run_settings import (
    command_line_keys,
    describe_data,
    describe_selection,
    follow,
    run_config,
    whose,
)

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from slm_cli.model.gpt import GPT
    from slm_cli.reference.models import ReferenceModel
    from slm_cli.selection.base import Selection


# ---- the statistics ---------------------------------------------------------------------------

def build_strategy(selection_cfg: DictConfig) -> Selection:
    """The strategy of conf/selection/<name>.yaml with the user's settings. A RHO-1 reference is run
    here on the page's tokens, so the strategy reads its losses from the batch (mode precomputed)
    rather than loading the reference a second time."""
    from slm_cli.config import build

    # A followed run's config may hold `scope`, a training setting rather than the strategy's.
    settings = OmegaConf.masked_copy(selection_cfg, [k for k in selection_cfg if k != "scope"])
    if "reference" in settings:
        settings.reference.mode = "precomputed"
    return build(settings)


def compute(model: GPT, input_ids: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor,
            strategy: Selection, reference: ReferenceModel | None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-token values of one (1, n) window and the strategy's mask over its n tokens."""
    stats = model_token_stats(model, input_ids, labels, entropy=True)
    values = {"loss": stats.loss.double().numpy(), "entropy": stats.entropy.double().numpy()}
    batch: dict[str, torch.Tensor] = {"input_ids": input_ids, "labels": labels, "positions": positions}
    if reference is not None:
        ref_loss, ref_entropy = reference.token_stats(input_ids, labels)
        batch["ref_loss"], batch["ref_entropy"] = ref_loss.float().cpu(), ref_entropy.float().cpu()
        values["reference_loss"] = ref_loss.reshape(-1).double().cpu().numpy()
        values["reference_entropy"] = ref_entropy.reshape(-1).double().cpu().numpy()
        values["excess"] = values["loss"] - values["reference_loss"]
    features = strategy.features(stats if strategy.reads_model else None, batch)
    mask = strategy.select(features).mask.reshape(-1).cpu().numpy().astype(bool)
    return values, mask


# ---- the command ------------------------------------------------------------------------------

def _text(cfg: DictConfig) -> str | None:
    given = [k for k in ("text", "file", "split") if cfg.get(k) is not None]
    if len(given) != 1:
        which = "none" if not given else " and ".join(f"{k}=" for k in given)
        raise SlmError(f"slm tokens shows one text, but {which} was given: pass text=\"...\", file=<a .txt file> "
                       "or split=val window=<K>")
    if cfg.file is not None:
        path = Path(str(cfg.file)).expanduser()
        if not path.is_file():
            raise SlmError(f"file={cfg.file} does not exist: pass a text file")
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise SlmError(f"file={cfg.file} is not UTF-8 text: pass a text file") from None
    return None if cfg.text is None else str(cfg.text)


def _check(cfg: DictConfig) -> None:
    from slm_cli.config import is_int, is_number

    if cfg.value not in VALUES:
        raise SlmError(f"value={cfg.value} is not known: use one of {', '.join(VALUES)}")
    if cfg.split is not None and cfg.split not in ("val", "train"):
        raise SlmError(f"split={cfg.split} is not a split: use split=val or split=train")
    if not (is_int(cfg.window) and cfg.window >= 0):
        raise SlmError(f"window={cfg.window} must be a window index >= 0: e.g. window=0")
    for key in ("vmin", "vmax"):
        if cfg[key] is not None and not is_number(cfg[key]):
            raise SlmError(f"{key}={cfg[key]} must be a number or null")
    if not cfg.out:
        raise SlmError("out= is empty: pass the page's file name, e.g. out=tokens.html")


def _window(cfg: DictConfig, model: GPT, tokenizer: Tokenizer, eos: int | None, text: str | None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, labels, positions), each of shape (1, n): the model predicts labels from input_ids."""
    block = model.config.block_size
    if text is not None:
        tokenizer.encode_special_tokens = True  # as `slm prepare`: "<|endoftext|>" in a text is text
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if not ids:
            raise SlmError("the text is empty: pass text=\"...\" with at least one token")
        if eos is None:
            raise SlmError(f"ckpt_path={cfg.ckpt_path}: its tokenizer has no end-of-text token to start the text "
                           "from: pass split=val window=<K> instead")
        if len(ids) > block:
            raise SlmError(f"the text is {len(ids)} tokens but the model's context is {block} tokens: shorten it to "
                           f"{block} tokens or fewer (or show a corpus window: split=val window=<K>)")
        # The text is a document's start, as in training, where every document follows an EOS.
        window = [eos, *ids]
        return (torch.tensor([window[:-1]]), torch.tensor([window[1:]]), torch.arange(1, len(window))[None])
    from slm_cli.data.prepare import prepare
    from slm_cli.data.windows import ValWindows

    prepared = prepare(cfg.data, cfg.paths, tokenizer_spec=str(cfg.ckpt_path))
    windows = ValWindows(prepared.tokens(cfg.split), block)
    if cfg.window >= len(windows):
        raise SlmError(f"window={cfg.window} is past the end of the {cfg.split} split of {prepared.dir} "
                       f"({len(windows)} windows of {block} tokens): pass window=0..{len(windows) - 1}")
    item = windows[int(cfg.window)]
    return item["input_ids"][None], item["labels"][None], item["positions"][None]


def _reference(cfg: DictConfig, taken: list[str], tokenizer_json: str, strategy: Selection) -> ReferenceModel | None:
    """The reference model of ``reference=`` (by default the selection's
    ``selection.reference.ckpt_path``), checked against the model's tokenizer; None if none is needed."""
    from slm_cli.selection.rho1 import Rho1

    spec = cfg.reference
    if spec is None:
        if cfg.value in ("reference_loss", "excess"):
            raise SlmError(f"value={cfg.value} needs a reference model: pass reference=<checkpoint> (or "
                           "selection=rho1 selection.reference.ckpt_path=<checkpoint>)")
        if isinstance(strategy, Rho1) and "selection" in taken:
            raise SlmError(f"the selection of {cfg.ckpt_path} (selection=rho1) read its reference losses from `slm "
                           "score`: pass reference=<that reference checkpoint> to mark its choice here")
        if isinstance(strategy, Rho1):
            raise SlmError("selection=rho1 ranks tokens by a reference model's losses: pass "
                           "selection.reference.ckpt_path=<reference checkpoint, run dir or Hugging Face folder>")
        return None
    from slm_cli.model.load import TokenizerId, check_tokenizer
    from slm_cli.reference.models import load

    key = "reference" if "reference" in command_line_keys() else "selection.reference.ckpt_path"
    reference = load(str(spec), key=key)
    check_tokenizer(reference.tokenizer_id, TokenizerId.of_json(tokenizer_json, f"ckpt_path={cfg.ckpt_path}"),
                    key=key, spec=str(spec), fix=f"pass a {key} trained with the tokenizer of ckpt_path")
    return reference


def _settings_line(cfg: DictConfig, taken: list[str], text: str | None) -> str:
    """The first printed line: the selection marked and where the tokens come from, and which of
    these are the run's own."""
    spec = str(cfg.ckpt_path)
    source = "the text given" if text is not None else (
        f"{whose('data', taken, spec)}data ({describe_data(cfg)}), split {cfg.split} window {cfg.window}")
    return f"tokens: {whose('selection', taken, spec)}selection ({describe_selection(cfg.selection)}), {source}"


def view(cfg: DictConfig) -> tuple[TokenView, dict[str, Any]]:
    """The page's tokens and values, and what produced them."""
    from tokenizers import Tokenizer

    from slm_cli.data.tokenizer import eos_id
    from slm_cli.model.load import load_gpt

    _check(cfg)
    text = _text(cfg)
    model, entry = load_gpt(str(cfg.ckpt_path))
    run = run_config(str(cfg.ckpt_path), entry)
    cfg, taken = follow(cfg, run, ("data", "paths.data_dir", "selection"))
    print(_settings_line(cfg, taken, text))
    strategy = build_strategy(cfg.selection)
    reference = _reference(cfg, taken, entry["tokenizer_json"], strategy)
    tokenizer = Tokenizer.from_str(entry["tokenizer_json"])
    try:
        eos = eos_id(tokenizer, (run.get("data") or {}).get("eos_token"))
    except SlmError:
        eos = None
    input_ids, labels, positions = _window(cfg, model, tokenizer, eos, text)
    n = labels.shape[1]
    if reference is not None:
        shorter = f"shorten the text to {reference.block_size} tokens or fewer"
        reference.check_context(n, what=f"the page's {n} tokens",
                                fix=shorter if text is not None else f"pass a {reference.key} with a longer context")
    values, mask = compute(model, input_ids, labels, positions, strategy, reference)
    ids = labels[0].tolist()
    if text is not None:
        pieces = token_pieces(tokenizer, ids)
        before = ""
    else:  # decode with the context token, which may hold the first bytes of the first shown character
        pieces = token_pieces(tokenizer, [int(input_ids[0, 0]), *ids])
        before, pieces = pieces[0], pieces[1:]
    info = {"checkpoint": str(cfg.ckpt_path), "model": model.config, "strategy": strategy,
            "source": "text" if text is not None else f"{cfg.split} window {cfg.window}",
            "reference": None if reference is None else reference.spec}
    return TokenView(ids=ids, pieces=pieces, values=values, selected=mask, before=before), info


def tokens(cfg: DictConfig) -> Path:
    """`slm tokens`: write the page; returns its path."""
    token_view, info = view(cfg)
    text = page(token_view, info, str(cfg.value), cfg.vmin, cfg.vmax)
    out = atomic_write(Path(str(cfg.out)), lambda f: f.write(text.encode()))
    k, n = int(token_view.selected.sum()), len(token_view.ids)
    print(f"tokens: {n} tokens, {k} selected by {info['strategy'].name}, mean {LABELS[cfg.value]} "
          f"{float(token_view.values[cfg.value].mean()):.4f} -> {out}")
    return out
