"""`slm export`: an slm checkpoint -> a Hugging Face folder that ``AutoModelForCausalLM`` and
``AutoTokenizer.from_pretrained(folder)`` load with no slm code.

The folder holds config.json and model.safetensors (GPT-2, through slm_cli/model/hf.py),
generation_config.json, the run's own tokenizer.json byte for byte (so `slm prepare`'s tokenizer
identity, and with it ``data.tokenizer=<folder>``, is unchanged), tokenizer_config.json and
special_tokens_map.json naming the EOS, and a model card README.md. It is written into a temporary
folder next to ``out`` and renamed into place at the end, so an interrupted export leaves nothing
that looks like a model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

from slm_cli.data.tokenizer import eos_id
from slm_cli.errors import SlmError
from slm_cli.model.hf import require_hf, to_hf
from slm_cli.model.load import checkpoint_file, load_model
from slm_cli.outputs import RUN_DIR_CHECKPOINT, load_checkpoint
from slm_cli.summary import RunSummary
from slm_cli.summary import read as read_summary

# What the model card shows of the run's resolved config.
CARD_SECTIONS = ("selection", "target", "model", "data", "optim")


def check_out(out: Path, replace: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SlmError(f"out={out} exists and is a file: pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not replace:
        raise SlmError(f"out={out} already exists and is not empty: pass a new folder, or remove it first")


def export(spec: str | Path, out: str | Path, *, replace: bool = False) -> Path:
    """Export the checkpoint ``spec`` (a .ckpt, run dir or sharded folder) to the folder ``out``.
    ``replace`` swaps an existing ``out`` for the new export (trainer.export_at_end's run/hf/)."""
    require_hf("slm export")
    out = Path(out).expanduser()
    check_out(out, replace)
    ckpt_file = checkpoint_file(spec)
    ckpt = load_checkpoint(ckpt_file)
    model = load_model(ckpt)
    entry = ckpt["slm"]
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(entry["tokenizer_json"])
    run_config = entry.get("config") or {}
    eos = eos_id(tokenizer, (run_config.get("data") or {}).get("eos_token"))
    hf = to_hf(model, vocab_size=tokenizer.get_vocab_size(), eos_token_id=eos)

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        hf.generation_config = generation_config(eos)
        hf.save_pretrained(stage)  # config.json, model.safetensors, generation_config.json
        write_tokenizer(stage, entry["tokenizer_json"], tokenizer.id_to_token(eos), model.config.block_size)
        card = model_card(out.name, ckpt, model, hf, run_summary(ckpt_file, ckpt))
        (stage / "README.md").write_text(card)
        # mkdtemp makes the folder 0700 and save_pretrained may write 0600 files: give them the usual ones
        mask = _umask()
        os.chmod(stage, 0o777 & ~mask)
        for path in stage.iterdir():
            os.chmod(path, 0o666 & ~mask)
        commit(stage, out, replace)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def commit(stage: Path, out: Path, replace: bool) -> None:
    """Rename the staged folder to ``out``; an existing ``out`` (empty, or replaced) is moved aside
    first and removed after, so ``out`` is at every moment either the old folder or the new one."""
    check_out(out, replace)  # again: something may have been written there while the model loaded
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def generation_config(eos: int) -> Any:
    """GPT-2's: generation starts after and stops at the EOS (the document separator)."""
    transformers = require_hf("slm export")
    return transformers.GenerationConfig(bos_token_id=eos, eos_token_id=eos)


def write_tokenizer(folder: Path, tokenizer_json: str, eos: str, block_size: int) -> None:
    """The fast tokenizer as AutoTokenizer reads it: tokenizer.json as trained (ids unchanged) and
    the special tokens. ``PreTrainedTokenizerFast`` takes tokenizer.json as it is, whatever
    tokenizer slm trained with (a GPT2Tokenizer class would rebuild its own pre-tokenizer)."""
    (folder / "tokenizer.json").write_text(tokenizer_json)
    specials = {"bos_token": eos, "eos_token": eos}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "model_max_length": block_size,
        "add_bos_token": False,
        # decode(encode(text)) == text: no clean-up of spaces before punctuation
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def run_summary(ckpt_file: Path, ckpt: dict[str, Any]) -> RunSummary | None:
    """The run's summary.json, when ``ckpt_file`` is the run's final last.ckpt (the summary
    describes that state, not an earlier step<N>.ckpt)."""
    if ckpt_file.parts[-2:] != RUN_DIR_CHECKPOINT.parts:
        return None
    try:
        summary = read_summary(ckpt_file.parent.parent)
    except (OSError, ValueError):
        return None
    return summary if summary.steps == ckpt.get("global_step") else None


def model_card(name: str, ckpt: dict[str, Any], model: Any, hf: Any, summary: RunSummary | None) -> str:
    """README.md: what the model is, how to load it, and how slm trained it."""
    from omegaconf import OmegaConf

    cfg = ckpt["slm"].get("config") or {}
    counters = ckpt["slm"].get("counters") or {}
    c, hf_config = model.config, hf.config
    hf_params = sum(p.numel() for p in hf.parameters())  # the tied embedding once, no padding rows
    selection = (cfg.get("selection") or {}).get("name", "unknown")
    target = (cfg.get("target") or {}).get("name", "unknown")
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", f"tags: [slm, gpt2, {selection}]",
        "---", "", f"# {name}", "",
        f"A GPT-2 model pretrained with slm (selection `{selection}`, "
        f"target `{target}`): {c.n_layer} layers, {c.n_head} heads, width {c.n_embd}, context {c.block_size}, "
        f"vocabulary {hf_config.vocab_size}, {hf_params / 1e6:.2f}M parameters.", "",
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```", "",
        "## Training", "",
        "| | |", "|---|---|",
        f"| optimizer steps | {ckpt.get('global_step', 'unknown')} |",
        f"| tokens seen | {int(counters.get('train_tokens', 0)):,} |",
        f"| tokens trained on (selected) | {int(counters.get('selected_tokens', 0)):,} |",
        f"| validation loss (slm, padded vocabulary) | {_figure(ckpt['slm'].get('val_loss'))} |", "",
    ]
    if summary:
        lines += ["## Run summary (summary.json)", "", "| key | value | meaning |", "|---|---|---|"]
        lines += [f"| `{f.name}` | {_figure(value)} | {f.metadata['doc']} |" for f in fields(summary)
                  if f.metadata["kind"] == "number" and (value := getattr(summary, f.name)) is not None]
        lines.append("")
    sections = {k: cfg[k] for k in CARD_SECTIONS if k in cfg}
    if sections:
        lines += ["## Training config", "", "```yaml", OmegaConf.to_yaml(OmegaConf.create(sections)).rstrip(), "```", ""]
    return "\n".join(lines)


def _figure(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "unknown" if value is None else str(value)
