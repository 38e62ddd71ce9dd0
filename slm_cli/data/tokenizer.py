"""Tokenizers: train a byte-level BPE, or load one from a file, folder, slm checkpoint or the hub."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from slm_cli.errors import SlmError

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>")
BPE_EOS = EOS_CANDIDATES[0]


def train_bpe(batches: Iterable[list[str]], vocab_size: int) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE; the full byte alphabet is seeded so any text encodes."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise SlmError(
            f"data.vocab_size={vocab_size} is too small for a byte-level BPE: "
            f"set data.vocab_size >= {len(alphabet) + 1} (256 bytes + {BPE_EOS})"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BPE_EOS],
        initial_alphabet=alphabet,
        show_progress=True,
    )
    tok.train_from_iterator(batches, trainer=trainer)
    return tok


def _looks_local(spec: str) -> bool:
    """Specs that can only mean a local path: these fail fast instead of retrying the hub for ~20 s."""
    return spec.endswith((".json", ".ckpt")) or spec.startswith(("/", "./", "../", "~"))


def _from_checkpoint(path: Path) -> Tokenizer:
    import torch  # deferred: torch is slow to import and only needed for checkpoints

    try:
        if path.is_dir():  # a sharded checkpoint (trainer=fsdp): no shard needs reading
            from slm_cli.outputs import load_checkpoint

            ckpt = load_checkpoint(path, tensors=False)
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return Tokenizer.from_str(ckpt["slm"]["tokenizer_json"])
    except Exception as e:  # any failure here means the file is not a usable slm checkpoint
        raise SlmError(
            f"cannot read a tokenizer from checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0]}): "
            "pass an slm checkpoint saved by `slm train`, a tokenizer.json or a run dir"
        ) from None


def _from_json(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise SlmError(
            f"cannot parse tokenizer file {path} ({str(e).splitlines()[0]}): "
            "point it at a valid tokenizer.json, or delete it and re-run `slm prepare`"
        ) from None


def load_tokenizer(spec: str) -> Tokenizer:
    """Load a tokenizer from a tokenizer.json, a data/run folder, an slm ``.ckpt`` or a hub name."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return _from_json(path / "tokenizer.json")
        from slm_cli.outputs import RUN_DIR_CHECKPOINT, is_sharded_checkpoint  # deferred: it imports torch

        if is_sharded_checkpoint(path):
            return _from_checkpoint(path)
        if (path / RUN_DIR_CHECKPOINT).exists():
            return _from_checkpoint(path / RUN_DIR_CHECKPOINT)
        raise SlmError(
            f"folder {path} has no tokenizer.json nor {RUN_DIR_CHECKPOINT}: "
            "point the tokenizer at a prepared data folder, an slm run dir or a tokenizer file"
        )
    if path.is_file():
        return _from_checkpoint(path) if path.suffix == ".ckpt" else _from_json(path)
    if _looks_local(spec):
        raise SlmError(
            f"tokenizer {spec} does not exist: point it at an existing tokenizer.json, .ckpt or folder"
        )
    try:
        return Tokenizer.from_pretrained(spec)
    except Exception as e:
        raise SlmError(
            f"tokenizer {spec!r} is neither a local file/folder nor a reachable hub tokenizer "
            f"({type(e).__name__}): check the path or name, or use data.tokenizer=bpe"
        ) from None


def tokenizer_sha256(tok: Tokenizer) -> str:
    """Identity of a tokenizer: the hash of its canonical JSON serialisation."""
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


def eos_id(tok: Tokenizer, eos_token: str | None) -> int:
    """Id of the document separator: ``eos_token`` if given, else the first known EOS in the vocab."""
    candidates = (eos_token,) if eos_token else EOS_CANDIDATES
    for token in candidates:
        token_id = tok.token_to_id(token)
        if token_id is not None:
            return token_id
    if eos_token:
        raise SlmError(
            f"data.eos_token={eos_token!r} is not in the tokenizer vocabulary: set data.eos_token to one of its tokens"
        )
    raise SlmError(
        f"the tokenizer has none of the end-of-text tokens {', '.join(EOS_CANDIDATES)}: "
        "set data.eos_token to the token that separates documents"
    )
