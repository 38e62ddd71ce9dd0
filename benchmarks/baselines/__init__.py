"""Baselines the benchmarks compare slm with (not part of slm)."""
