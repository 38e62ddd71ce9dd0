"""gpu: GPT-2 124M in bf16 on one CUDA GPU: tokens/s, MFU and peak memory of CLM and of each strategy
at keep 0.6 and 0.4, eager and with trainer.compile=true, and each strategy's step time / CLM's.

Ready for the day a GPU is there (`make bench ARGS=gpu`); on a machine without one it says so in one
line. Sized to fit in about 10 minutes on one modern GPU: 8 windows of 1024 tokens per step, 3 warm-up
and 10 timed steps per variant (compiled variants: 8 warm-up steps, the compilation inside them).
Not part of the default `make bench` run.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    CACHE_DIR,
    BenchError,
    Benchmark,
    compose_train,
    corpus_overrides,
    table,
)

FULL = {"batch_size": 8, "warmup": 3, "compiled_warmup": 8, "steps": 10}
QUICK = {"batch_size": 4, "warmup": 2, "compiled_warmup": 5, "steps": 4}
# (label, overrides, keep); rho1 uses the selection_step benchmark's reference and scores.
STRATEGIES = [
    ("clm", ["selection=clm"], 1.0),
    ("eslm", ["selection=eslm"], 0.6),
    ("eslm alpha=0.6", ["selection=eslm", "selection.alpha=0.6"], 0.4),
    ("eslm entropy", ["selection=eslm", "selection.score=entropy"], 0.6),
    ("eslm entropy alpha=0.6", ["selection=eslm", "selection.score=entropy", "selection.alpha=0.6"], 0.4),
    ("random", ["selection=random"], 0.6),
]
COMPILED = ("clm", "eslm", "eslm alpha=0.6")


def _clock():  # type: ignore[no-untyped-def]
    """Step times with a device synchronisation at each step end (CUDA runs asynchronously)."""
    import lightning as L
    import torch

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.iters: list[float] = []
            self._mark = 0.0

        def on_train_start(self, trainer, pl_module) -> None:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._mark = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            torch.cuda.synchronize()
            now = time.perf_counter()
            self.iters.append(now - self._mark)
            self._mark = now

    return Clock()


def gpu(quick: bool) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        raise BenchError("no CUDA device on this machine: run `make bench ARGS=gpu` on a machine with a GPU")
    from slm_cli.estimate import GPU_PEAK
    from slm_cli.run import train

    p = QUICK if quick else FULL
    device = torch.cuda.get_device_name(0)
    peak = next((v for k, v in GPU_PEAK.items() if k.split()[0] in device), None)
    corpus, data = corpus_overrides()
    rows, figures = [], {}
    variants = [(label, o, k, False) for label, o, k in STRATEGIES]
    variants += [(label, o, k, True) for label, o, k in STRATEGIES if label in COMPILED]
    for label, overrides, keep, compiled in variants:
        warmup = p["compiled_warmup"] if compiled else p["warmup"]
        steps = warmup + p["steps"]
        run_dir = CACHE_DIR / "runs" / "gpu" / f"{label.replace(' ', '_')}{'-compiled' if compiled else ''}"
        cfg = compose_train([*data, "trainer=gpu", "model=gpt2", f"data.batch_size={p['batch_size']}",
                             f"trainer.compile={str(compiled).lower()}", f"trainer.max_steps={steps}",
                             f"trainer.val_check_interval={steps}", "trainer.limit_val_batches=1",
                             f"trainer.checkpoint_every_n_steps={10**9}", "trainer.enable_progress_bar=false",
                             *overrides, f"paths.output_dir={run_dir}", f"paths.log_dir={run_dir.parent}"])
        clock = _clock()
        summary = train(cfg, callbacks=[clock])
        timed = clock.iters[warmup:]
        step_s = statistics.median(timed)
        flops_per_step = summary["flops_realized"] / summary["steps"]
        name = f"{label}{' compiled' if compiled else ''}"
        figures[name] = {
            "keep": keep, "compiled": compiled, "ms_per_step": step_s * 1e3,
            "tokens_per_s": summary["train_tokens"] / summary["steps"] / step_s,
            "mfu": flops_per_step / step_s / peak if peak else None,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
            "flops_saved_frac_realized": summary["flops_saved_frac_realized"],
        }
        Path(summary["checkpoint"]).unlink(missing_ok=True)
    for name, f in figures.items():
        base = figures["clm compiled" if f["compiled"] else "clm"]["ms_per_step"]
        f["ratio_to_clm"] = f["ms_per_step"] / base
        rows.append([name, f"{f['keep']:.1f}", f"{f['ms_per_step']:.0f}", f"{f['tokens_per_s']:,.0f}",
                     "-" if f["mfu"] is None else f"{f['mfu']:.1%}", f"{f['peak_memory_gib']:.1f}",
                     f"{f['ratio_to_clm']:.3f}", f"{f['flops_saved_frac_realized']:.3f}"])
    print(f"device: {device}; corpus {corpus}; gpt2 124M, bf16-mixed, {p['batch_size']} x 1024 tokens per step")
    print(table(["variant", "k", "ms/step", "tokens/s", "MFU", "peak GiB", "step / CLM's", "realised saved"], rows))
    return {"quick": quick, "device": device, "peak_flops": peak, **p, "variants": figures}


BENCHMARK = Benchmark("gpu", "GPT-2 124M bf16 on one CUDA GPU: tokens/s, MFU, memory, step / CLM's", gpu)
