"""Evaluation of a trained model: perplexity on a corpus split (and downstream tasks)."""
