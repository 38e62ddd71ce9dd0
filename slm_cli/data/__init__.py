"""Data: corpus sources, tokenizers, prepared token streams and the training/validation windows."""

from slm_cli.data.prepare import PreparedData, load_prepared, prepare, token_dtype
from slm_cli.data.sources import load_documents, source_description, source_fingerprint, source_name
from slm_cli.data.tokenizer import EOS_CANDIDATES, eos_id, load_tokenizer, tokenizer_sha256, train_bpe
from slm_cli.data.windows import StepSampler, TrainWindows, ValWindows, sample_starts

__all__ = [
    "EOS_CANDIDATES",
    "PreparedData",
    "StepSampler",
    "TrainWindows",
    "ValWindows",
    "eos_id",
    "load_documents",
    "load_prepared",
    "load_tokenizer",
    "prepare",
    "sample_starts",
    "source_description",
    "source_fingerprint",
    "source_name",
    "token_dtype",
    "tokenizer_sha256",
    "train_bpe",
]
