"""ngram_build: `slm ngram`'s vectorised build (`build_ngram`): throughput and memory for n = 3, 4, 5 on
a real-text and a Zipf stream, each build in a fresh process; goal: >= 2M tokens/s for n <= 4. Then slm's
build vs two pure-Python count tries (benchmarks/baselines/tries.py) on a prefix; goal: >= 50x the
literal port of the authors' design."""

from __future__ import annotations

import glob
import math
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.baselines.tries import TRIE_TOP_R, count_trie, trie_rows
from benchmarks.common import (
    CACHE_DIR,
    CORPORA_DIR,
    BenchError,
    Benchmark,
    compose_train,
    corpus_file,
    run_child,
    table,
)

NGRAM_FULL = {"tokens": 10_000_000, "ns": (3, 4, 5), "r": 8, "rounds": 3, "prefix": 1_000_000}
NGRAM_QUICK = {"tokens": 2_000_000, "ns": (4,), "r": 8, "rounds": 1, "prefix": 50_000}
NGRAM_VOCAB = 4096  # 12-bit ids: n = 5 fits the 64-bit key (5 x 12 = 60 bits)
NGRAM_ZIPF = 1.1
# (shards, chunk_tokens): `slm ngram`'s default, and 4 hash shards with 2^22-token chunks, which
# shrink the per-chunk work arrays as well as the tables (docs/ngram.md)
NGRAM_SHARDINGS = ((1, 1 << 24), (4, 1 << 22))
# The real stream's text: the corpora vendored in corpora/, in the order data.path's glob sorts them.
NGRAM_TEXTS = ("tinyshakespeare/input.txt", "wikitext-2/test.txt", "wikitext-2/valid.txt")


def _ngram_streams(n_tokens: int) -> dict[str, dict[str, Any]]:
    """The two token streams of ngram_build as uint16 .bin files in .cache/ngram/ (V = 4096):
    real text (NGRAM_TEXTS + the stdlib source, one BPE) and i.i.d. Zipf(1.1) ids."""
    import numpy as np

    from slm_cli.data.prepare import prepare

    out_dir = CACHE_DIR / "ngram"
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = f"paths.data_dir={CACHE_DIR / 'data'}"
    texts = [str(corpus_file(t)) for t in NGRAM_TEXTS]  # a BenchError names a missing one
    pattern = str(CORPORA_DIR / "*" / "*.txt")
    if sorted(glob.glob(pattern)) != texts:
        raise BenchError(f"{pattern} matches {sorted(glob.glob(pattern))}, expected exactly {texts}")
    cfg = compose_train([data_dir, "data=text", f"data.path={pattern}", "data.name=corpora-text-bpe4096",
                         f"data.vocab_size={NGRAM_VOCAB}"])
    text = prepare(cfg.data, cfg.paths)
    parts = [text.tokens("train"), text.tokens("val")]
    sources = [f"{', '.join(NGRAM_TEXTS)} ({text.meta['train_tokens'] + text.meta['val_tokens']:,} tokens)"]
    cfg = compose_train([data_dir, "data=stdlib", "data.name=stdlib-bpe4096",  # all of it: ~25 MB
                         f"data.tokenizer={text.tokenizer_path}"])
    code = prepare(cfg.data, cfg.paths)
    if code.vocab_size != NGRAM_VOCAB:
        raise RuntimeError(f"{code.dir}: vocabulary {code.vocab_size}, expected {NGRAM_VOCAB}")
    parts += [code.tokens("train"), code.tokens("val")]
    sources.append(f"the stdlib source ({code.meta['train_tokens'] + code.meta['val_tokens']:,} tokens)")
    real = np.concatenate([np.asarray(p, dtype=np.uint16) for p in parts])
    distinct = len(real)
    tiles = math.ceil(n_tokens / distinct)
    real = np.tile(real, tiles)[:n_tokens] if tiles > 1 else real[:n_tokens]

    rng = np.random.default_rng(0)
    weights = 1.0 / np.arange(1, NGRAM_VOCAB + 1, dtype=np.float64) ** NGRAM_ZIPF
    ranks = rng.choice(NGRAM_VOCAB, size=n_tokens, p=weights / weights.sum())
    zipf = rng.permutation(NGRAM_VOCAB).astype(np.uint16)[ranks]  # rank -> a random id

    streams = {}
    for label, tokens, desc in (
        ("real", real, " + ".join(sources) + f" = {distinct:,} tokens" + (
            f", TILED to {n_tokens:,} (its first {n_tokens - distinct:,} tokens repeat: more repeated n-grams "
            "than real text of that length)" if tiles > 1 else f", the first {n_tokens:,} used (not tiled)")),
        ("zipf", zipf, f"i.i.d. Zipf({NGRAM_ZIPF}) ids over V={NGRAM_VOCAB} (seed 0), not tiled"),
    ):
        path = out_dir / f"{label}-{n_tokens}.bin"
        tmp = path.with_suffix(".tmp")
        tokens.astype(np.uint16).tofile(tmp)
        os.replace(tmp, path)
        streams[label] = {"path": str(path), "tokens": n_tokens, "source": desc,
                          "distinct_tokens": distinct if label == "real" else n_tokens}
    return streams


def _vm_mib(field: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _ngram_build_child(path: str, n: int, r: int, shards: int, chunk_tokens: int, trace: bool) -> dict[str, Any]:
    """`build_ngram` over a memmapped stream into memmapped outputs (as `slm ngram` does), in this
    fresh process: timed, with the peak RSS over the build; then, with ``trace``, once more under
    tracemalloc (numpy reports its array allocations to it) for the peak of the heap arrays, with
    a digest of the outputs. The RSS peak is reset right before each build (/proc/self/clear_refs),
    as ru_maxrss would start from the parent's peak, which a child inherits across fork."""
    import hashlib
    import tracemalloc

    import numpy as np

    from slm_cli.ngram.build import build_ngram, id_dtype

    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    int(tokens.sum(dtype=np.uint64))  # page the stream in before the baseline: it is the input, not the build
    out = CACHE_DIR / "ngram" / f"out-{os.getpid()}"
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {}
    try:
        for traced in (False, True) if trace else (False,):
            ids = np.lib.format.open_memmap(out / "ids.npy", mode="w+", dtype=id_dtype(NGRAM_VOCAB),
                                            shape=(len(tokens), r))
            probs = np.lib.format.open_memmap(out / "probs.npy", mode="w+", dtype=np.float32, shape=(len(tokens), r))
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            baseline = _vm_mib("VmRSS")
            if traced:
                tracemalloc.start()
            t0 = time.perf_counter()
            _, _, stats = build_ngram(tokens, NGRAM_VOCAB, n, r, chunk_tokens=chunk_tokens, shards=shards,
                                      dtype="float32", out=(ids, probs))
            seconds = time.perf_counter() - t0
            if traced:
                result["traced_peak_bytes"] = tracemalloc.get_traced_memory()[1]
                result["traced_seconds"] = seconds
                tracemalloc.stop()
                result["digest"] = hashlib.sha256(np.ascontiguousarray(ids).data).hexdigest()[:16] + \
                    hashlib.sha256(np.ascontiguousarray(probs).data).hexdigest()[:16]
            else:
                result.update(seconds=seconds, baseline_mib=baseline, peak_mib=_vm_mib("VmHWM"), **stats)
            del ids, probs
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return result



def _ngram_trie_child(path: str, prefix: int, n: int, r: int, repeats: int) -> dict[str, Any]:
    """slm's build and both count tries on the first ``prefix`` tokens of a stream: rates and equality.
    slm's build runs ``repeats`` times before, between and after the tries, so that each trie has
    2 x ``repeats`` slm builds next to it in time (the machine's load can change over the minutes a
    trie takes). Each trie is timed end to end (list conversion, counting, rows), with the counting
    and row phases also reported apart; the 1-minute load average is read before and after each."""
    import numpy as np

    from slm_cli.ngram.build import build_ngram

    tokens = np.array(np.memmap(path, dtype=np.uint16, mode="r")[:prefix])

    def slm_builds() -> list[float]:
        secs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            build_ngram(tokens, NGRAM_VOCAB, n, r, dtype="float32")
            secs.append(time.perf_counter() - t0)
        return secs

    ids, probs, stats = build_ngram(tokens, NGRAM_VOCAB, n, r, dtype="float32")  # the reference rows (and a warm-up)
    slm_s = [slm_builds()]
    result: dict[str, Any] = {**stats}
    for scan, top_r in TRIE_TOP_R.items():
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        as_list = tokens.tolist()  # the list conversion is timed too
        root = count_trie(as_list, n)
        t1 = time.perf_counter()
        t_ids, t_probs = trie_rows(root, as_list, n, r, NGRAM_VOCAB, top_r)
        t2 = time.perf_counter()
        del root, as_list
        result[scan] = {"seconds": t2 - t0, "count_seconds": t1 - t0, "rows_seconds": t2 - t1,
                        "load_before": load, "load_after": os.getloadavg()[0],
                        "ids_equal": bool(np.array_equal(ids, t_ids)),
                        "probs_equal": bool(np.array_equal(probs, t_probs)),
                        "mismatched_rows": int(((ids != t_ids) | (probs != t_probs)).any(axis=1).sum())}
        del t_ids, t_probs
        slm_s.append(slm_builds())
        result[scan]["slm_seconds"] = slm_s[-2] + slm_s[-1]  # the builds just before and just after it
    result["slm_seconds"] = [s for batch in slm_s for s in batch]
    return result



def ngram_build(quick: bool) -> dict[str, Any]:
    p = NGRAM_QUICK if quick else NGRAM_FULL
    r, total = p["r"], p["tokens"]
    t0 = time.perf_counter()
    streams = _ngram_streams(total)
    print(f"streams ({total:,} tokens each, V={NGRAM_VOCAB}, uint16 memmaps; {time.perf_counter() - t0:.0f}s):")
    for label, s in streams.items():
        print(f"  {label}: {s['source']}")
    configs = [(label, n, shards, chunk) for label in streams for n in p["ns"] for shards, chunk in NGRAM_SHARDINGS]
    print(f"{len(configs)} configurations x {p['rounds']} timed rounds (configurations alternate: forward, then "
          f"reversed), each build in a fresh process (round 1's also run the traced build); r={r}, float32")

    timed: dict[tuple, list[dict]] = {c: [] for c in configs}
    for rnd in range(p["rounds"]):
        t0 = time.perf_counter()
        for c in configs if rnd % 2 == 0 else configs[::-1]:
            label, n, shards, chunk = c
            # The first round's processes also run the traced build (after the timed one).
            timed[c].append(run_child("ngram_build", path=streams[label]["path"], n=n, r=r, shards=shards,
                                       chunk_tokens=chunk, trace=rnd == 0))
        print(f"  round {rnd + 1}: {time.perf_counter() - t0:.0f}s", flush=True)
    traced = {c: timed[c][0] for c in configs}

    rows, figures = [], []
    for c in configs:
        label, n, shards, chunk = c
        secs = [t["seconds"] for t in timed[c]]
        med = statistics.median(secs)
        rss = max(t["peak_mib"] - t["baseline_mib"] for t in timed[c]) * 2**20 / total
        heap = traced[c]["traced_peak_bytes"] / total
        same = traced[c]["digest"] == traced[(label, n, *NGRAM_SHARDINGS[0])]["digest"]
        if not same:
            raise AssertionError(f"{label} n={n}: shards={shards} wrote other arrays than shards=1")
        goal = f">= 2M {'met' if total / med >= 2e6 else 'NOT met'}" if n <= 4 else ""
        rows.append([label, n, f"{shards} (chunk 2^{chunk.bit_length() - 1})", f"{traced[c]['contexts']:,}",
                     f"{traced[c]['ngrams']:,}", f"{med:.2f}", " ".join(f"{s:.2f}" for s in secs),
                     f"{total / med / 1e6:.2f}M", goal, f"{heap:.0f}", f"{rss:.0f}"])
        figures.append({"stream": label, "n": n, "r": r, "shards": shards, "chunk_tokens": chunk, "tokens": total,
                        "contexts": traced[c]["contexts"], "ngrams": traced[c]["ngrams"], "seconds": secs,
                        "seconds_median": med, "tokens_per_s": total / med,
                        "heap_peak_bytes_per_token": heap, "rss_increase_bytes_per_token": rss,
                        "same_arrays_as_shards1": same})
    print()
    print(table(["stream", "n", "shards", "contexts", "distinct n-grams", "s (median)", "s per round", "tokens/s",
                 "goal (n <= 4)", "heap B/token", "RSS B/token"], rows))
    print(f"\nheap B/token: tracemalloc peak over the build (numpy reports its array allocations to it; memmaps "
          f"are not allocations) / tokens, from a second, traced build. RSS B/token: the largest over rounds of "
          f"peak RSS during the build (VmHWM, reset before it) - RSS before it, / tokens, with the input already "
          f"paged in; it includes the output memmaps' pages (up to {r * 6} B/token at r={r}: uint16 ids + float32 "
          f"probs), which the kernel can write back and evict. shards=4 wrote byte-identical arrays to shards=1 "
          f"(sha256 checked)")

    # Same prefix, same process: slm's build vs both count tries (strict, literal), n=4.
    n, prefix = 4, p["prefix"]
    trie_rows, phase_rows, trie_figures = [], [], {}
    full_rate = {label: next(f["tokens_per_s"] for f in figures if f["stream"] == label and f["n"] == n
                             and f["shards"] == 1) for label in streams}
    for label, s in streams.items():
        t0 = time.perf_counter()
        res = run_child("ngram_trie", path=s["path"], prefix=prefix, n=n, r=r, repeats=3)
        for scan in TRIE_TOP_R:
            if not (res[scan]["ids_equal"] and res[scan]["probs_equal"]):
                raise AssertionError(f"{label}: the {scan} count trie and build_ngram disagree on "
                                     f"{res[scan]['mismatched_rows']} of {prefix:,} rows")
        slm_rates = {scan: prefix / statistics.median(res[scan]["slm_seconds"]) for scan in TRIE_TOP_R}
        rates = {scan: prefix / res[scan]["seconds"] for scan in TRIE_TOP_R}
        ratios = {scan: slm_rates[scan] / rates[scan] for scan in TRIE_TOP_R}
        trie_rows.append([label, f"{prefix:,}", f"{res['contexts']:,}",
                          f"{rates['strict']:,.0f}", f"{slm_rates['strict']:,.0f}", f"{ratios['strict']:,.0f}x",
                          f"{rates['literal']:,.0f}", f"{slm_rates['literal']:,.0f}", f"{ratios['literal']:,.0f}x",
                          f">= 50x {'met' if ratios['literal'] >= 50 else 'NOT met'}",
                          f"{'yes' if ratios['strict'] >= 50 else 'no'}", f"{full_rate[label]:,.0f}", "yes (both)"])
        phase_rows.append([label, " ".join(f"{s:.3f}" for s in res["slm_seconds"]), *(
            f"{res[scan]['seconds']:.2f} = {res[scan]['count_seconds']:.2f} + {res[scan]['rows_seconds']:.2f}"
            f" (load {res[scan]['load_before']:.1f} -> {res[scan]['load_after']:.1f})" for scan in TRIE_TOP_R)])
        trie_figures[label] = {"prefix_tokens": prefix, "n": n, "r": r, "contexts": res["contexts"],
                               "slm_seconds": res["slm_seconds"], "slm_tokens_per_s_full": full_rate[label],
                               **{scan: {**{k: res[scan][k] for k in ("seconds", "count_seconds", "rows_seconds",
                                                                      "load_before", "load_after", "slm_seconds")},
                                         "slm_tokens_per_s": slm_rates[scan], "tokens_per_s": rates[scan],
                                         "ratio": ratios[scan], "identical": True}
                                  for scan in TRIE_TOP_R},
                               "goal_50x_vs_literal_met": ratios["literal"] >= 50,
                               "wall_s": time.perf_counter() - t0}
        print(f"  trie comparison, {label}: {time.perf_counter() - t0:.0f}s", flush=True)
    print(f"\nslm's build vs two pure-Python count tries, n={n}, r={r}, V={NGRAM_VOCAB}, on the first {prefix:,} "
          f"tokens of each stream, all in one fresh process per stream. literal = the authors' design (top r by "
          f"an O(|V|) scan of every id, once per context); strict = the same trie, top r over the node's "
          f"distinct continuations only (faster than the authors'). slm: 3 builds (in-memory outputs) before, "
          f"between and after the tries; each trie is compared with the median of the 6 next to it")
    print(table(["stream", "prefix tokens", "contexts", "strict trie tokens/s", "slm tokens/s", "slm / strict",
                 "literal trie tokens/s", "slm tokens/s", "slm / literal", "goal (vs literal)", "strict >= 50x",
                 f"slm tokens/s on {total / 1e6:.0f}M", "identical ids+probs"], trie_rows))
    print("\nseconds on the prefix (trie: end to end = list conversion + counting, then rows; 1-min load average)")
    print(table(["stream", "slm builds (before, between, after)", "strict trie = count + rows",
                 "literal trie = count + rows"], phase_rows))
    return {"quick": quick, "tokens": total, "vocab_size": NGRAM_VOCAB, "r": r, "rounds": p["rounds"],
            "streams": streams, "builds": figures, "trie": trie_figures}


BENCHMARK = Benchmark("ngram_build", "`slm ngram` build throughput and memory (n = 3, 4, 5) vs a count-trie builder",
                      ngram_build, children={"ngram_build": _ngram_build_child, "ngram_trie": _ngram_trie_child})
