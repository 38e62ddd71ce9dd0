"""The GPT-2 model family."""

from slm_cli.model.gpt import GPT, GPTConfig, padded_vocab_size

__all__ = ["GPT", "GPTConfig", "padded_vocab_size"]
