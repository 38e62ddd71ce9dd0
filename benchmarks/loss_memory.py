"""loss_memory: the peak memory of slm's chunked loss path (`token_stats` + `weighted_loss`, forward and
backward) vs naive full logits, each variant in a fresh process; goal: <= 0.5x naive."""

from __future__ import annotations

import time
from typing import Any

from benchmarks.common import Benchmark, run_child, table

MEM_FULL = {"m": 8192, "d": 256, "v": 50304, "chunk_size": 1024}
MEM_QUICK = {"m": 2048, "d": 256, "v": 50304, "chunk_size": 1024}
MEM_VARIANTS = [  # (label, loss path, keep ratio)
    ("naive F.cross_entropy(hidden @ W.T)", "naive", 1.0),
    ("slm store, CLM", "store", 1.0),
    ("slm store, keep 0.6", "store", 0.6),
    ("slm recompute, CLM", "recompute", 1.0),
    ("slm recompute, keep 0.6", "recompute", 0.6),
]


def _maxrss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _loss_memory_child(path: str, keep: float, m: int, d: int, v: int, chunk_size: int) -> dict[str, Any]:
    """One variant in this (fresh) process: peak RSS above the baseline, for forward + backward."""
    import torch
    import torch.nn.functional as F

    from slm_cli.loss import token_stats, weighted_loss
    from slm_cli.selection.base import keep_count, top_k_mask

    torch.manual_seed(0)
    hidden = torch.randn(m, d).requires_grad_()
    weight = (torch.randn(v, d) * 0.02).requires_grad_()
    labels = torch.randint(0, v, (m,))
    # One warm small op (kernels, allocator, autograd engine) before the baseline is read.
    F.cross_entropy(hidden[:16] @ weight[:256].T, labels[:16] % 256).backward()
    hidden.grad = weight.grad = None
    baseline = _maxrss_mib()
    t0 = time.perf_counter()
    if path == "naive":
        loss = F.cross_entropy(hidden @ weight.T, labels)
    else:
        stats = token_stats(hidden.detach(), weight.detach(), labels, chunk_size=chunk_size,
                            keep_probs=path == "store")
        mask = torch.ones(m, dtype=torch.bool) if keep == 1.0 else top_k_mask(stats.loss, keep_count(keep, m))[0]
        weights = mask.float() / mask.sum()
        loss = weighted_loss(hidden, weight, labels, weights, stats, chunk_size=chunk_size)
    loss.backward()
    seconds = time.perf_counter() - t0
    return {"baseline_mib": baseline, "peak_mib": _maxrss_mib(), "seconds": seconds, "loss": float(loss),
            "grad_norm": float(torch.linalg.vector_norm(weight.grad))}


def loss_memory(quick: bool) -> dict[str, Any]:
    p = MEM_QUICK if quick else MEM_FULL
    m, d, v = p["m"], p["d"], p["v"]
    one = m * v * 4 / 2**20
    print(f"hidden ({m}, {d}) and head weight ({v}, {d}), float32, both requiring grad; chunk_size "
          f"{p['chunk_size']}; one ({m}, {v}) float32 tensor = {one:,.0f} MiB; each variant in a fresh process")
    results = {}
    for label, path, keep in MEM_VARIANTS:
        results[label] = run_child("loss_memory", path=path, keep=keep, **p) | {"path": path, "keep": keep}
        r = results[label]
        print(f"  {label:36s} +{r['peak_mib'] - r['baseline_mib']:7,.0f} MiB ({r['seconds']:.1f}s)", flush=True)

    naive = results[MEM_VARIANTS[0][0]]
    naive_inc = naive["peak_mib"] - naive["baseline_mib"]
    rows, figures = [], {}
    for label, path, _keep in MEM_VARIANTS:
        r = results[label]
        inc = r["peak_mib"] - r["baseline_mib"]
        ratio = inc / naive_inc
        goal = "" if path == "naive" else f"<= 0.5 {'met' if ratio <= 0.5 else 'NOT met'}"
        rows.append([label, f"{r['baseline_mib']:,.0f}", f"{r['peak_mib']:,.0f}", f"{inc:,.0f}", f"{inc / one:.2f}",
                     f"{ratio:.3f}", goal, f"{r['loss']:.5f}"])
        figures[label] = {**r, "increase_mib": inc, "increase_in_MV_tensors": inc / one, "ratio_to_naive": ratio}
    # Same work: the CLM variants must give the naive loss and head gradient (keep 0.6 trains a subset).
    for label, _path, keep in MEM_VARIANTS:
        r = results[label]
        if keep == 1.0 and (abs(r["loss"] - naive["loss"]) > 1e-4 * max(1.0, abs(naive["loss"]))
                            or abs(r["grad_norm"] - naive["grad_norm"]) > 1e-3 * naive["grad_norm"]):
            raise AssertionError(f"{label}: loss {r['loss']} / |grad W| {r['grad_norm']} differ from naive's "
                                 f"({naive['loss']} / {naive['grad_norm']})")
    print()
    print(table(["variant", "baseline MiB", "peak MiB", "increase MiB", "in (M,V) tensors", "ratio to naive",
                 "goal", "loss"], rows))
    print(f"\nincrease = peak RSS (ru_maxrss) after forward + backward - peak RSS after allocating the inputs and "
          f"one warm small op; one ({m}, {v}) float32 tensor = {one:,.0f} MiB")
    return {"quick": quick, **p, "one_MV_tensor_mib": one, "variants": figures}


BENCHMARK = Benchmark("loss_memory", "peak memory of slm's chunked loss (forward + backward) vs naive full logits",
                      loss_memory, children={"loss_memory": _loss_memory_child})
