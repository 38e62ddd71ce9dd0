"""slm benchmarks: `python benchmarks/run.py [names...] [--quick]` (what `make bench ARGS=...` runs).

Each benchmark is a module of this folder whose ``BENCHMARK`` (a :class:`benchmarks.common.Benchmark`)
is listed in :data:`BENCHMARKS` below; its ``run(quick)`` prints a small table and returns a dict of
figures, which the runner writes atomically to ``benchmarks/results/<name>.json`` (``<name>.quick.json``
with ``--quick``, so a smoke run never overwrites the recorded figures). A measurement that needs a
fresh process runs as `run.py --child NAME JSON` (:func:`benchmarks.common.run_child`). Scratch data
(prepared corpora, run dirs) goes to ``benchmarks/.cache/`` (not tracked). Figures and the machine
they were measured on are in docs/benchmarks.md.

To add a benchmark: write ``benchmarks/my_bench.py`` with ``def my_bench(quick: bool) -> dict`` and
``BENCHMARK = Benchmark("my_bench", "one line", my_bench)``, list it below, and add a section to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/run.py`: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import (  # noqa: E402
    clm_step,
    ddp_step,
    early_exit,
    gpu,
    loss_memory,
    ngram_build,
    prepare_scale,
    selection_step,
    step_profile,
    target_step,
)
from benchmarks.common import REPO_DIR, RESULTS_DIR, BenchError, Benchmark  # noqa: E402
from slm_cli.machine import machine  # noqa: E402

# The registry, in the order `make bench` runs them (all but those named in ON_REQUEST).
BENCHMARKS: dict[str, Benchmark] = {}
ON_REQUEST = ("gpu",)  # needs a CUDA device: run by name only
for _module in (clm_step, selection_step, step_profile, loss_memory, ngram_build, target_step, ddp_step, early_exit,
                prepare_scale, gpu):
    if _module.BENCHMARK.name in BENCHMARKS:
        raise ValueError(f"benchmark {_module.BENCHMARK.name!r} is registered twice")
    BENCHMARKS[_module.BENCHMARK.name] = _module.BENCHMARK


def _child(argv: list[str]) -> int:
    """`run.py --child NAME JSON`: a benchmark's measurement in a fresh process; prints JSON."""
    name, kwargs = argv[0], json.loads(argv[1])
    children = {child: fn for b in BENCHMARKS.values() for child, fn in b.children.items()}
    print(json.dumps(children[name](**kwargs)))
    return 0


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # internal: one measurement in a fresh process (loss_memory, ngram_build)
        return _child(argv[1:])
    listing = "\n".join(f"  {b.name:14s} {b.help}" for b in BENCHMARKS.values())
    parser = argparse.ArgumentParser(description="slm benchmarks (figures: docs/benchmarks.md)",
                                     epilog=f"benchmarks:\n{listing}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="smaller settings: a smoke run, not figures")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")

    from slm_cli.outputs import write_json

    for name in args.names or [n for n in BENCHMARKS if n not in ON_REQUEST]:
        print(f"== {name}{' (--quick)' if args.quick else ''}: {BENCHMARKS[name].help}", flush=True)
        t0 = time.perf_counter()
        try:
            figures = BENCHMARKS[name].run(args.quick)
        except BenchError as e:
            print(f"error: {name}: {e}", file=sys.stderr)
            return 1
        wall = time.perf_counter() - t0
        record = {"benchmark": name, "figures": figures, "wall_s": round(wall, 1), "machine": machine(),
                  "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        out = write_json(RESULTS_DIR / f"{name}{'.quick' if args.quick else ''}.json", _finite(record))
        print(f"== {name}: {wall:.0f}s; figures -> {out.relative_to(REPO_DIR)}\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
