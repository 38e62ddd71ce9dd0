"""slm's benchmarks: `python benchmarks/run.py [names...] [--quick]` (the runner, run.py), one module per
benchmark, the helpers they share (common.py) and the baselines they are compared with (baselines/)."""
