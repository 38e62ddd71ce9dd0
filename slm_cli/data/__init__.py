"""Data: corpus sources, tokenizers, prepared token streams and the training/validation windows."""
