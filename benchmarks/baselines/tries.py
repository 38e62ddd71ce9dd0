"""Pure-Python count-trie builders of n-gram rows, the baselines of the ngram_build benchmark: a port
of the design the authors released (in C) and a faster variant of it. Both give the same rows as
`slm_cli.ngram.build.build_ngram`: per position, the top r next ids of its (n−1)-token context by
count (ties: the smaller id first), with probability count / context count. See :func:`trie_build`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

TopR = Callable[[dict[int, int], int, int], list[tuple[int, int]]]


def count_trie(tokens: list[int], n: int) -> dict:
    """The count trie of both `trie_build` variants: dict nodes, one level per context token; the
    node of a context (depth n−1) maps next id -> count. One walk from the root per position."""
    m = n - 1
    root: dict = {}
    for i in range(m, len(tokens)):
        node = root
        for t in tokens[i - m : i - 1]:
            child = node.get(t)
            if child is None:
                child = node[t] = {}
            node = child
        last = tokens[i - 1]
        counts = node.get(last)
        if counts is None:
            counts = node[last] = {}
        x = tokens[i]
        counts[x] = counts.get(x, 0) + 1
    return root


def top_r_continuations(counts: dict[int, int], r: int, vocab_size: int) -> list[tuple[int, int]]:
    """The strict variant: the r best (next id, count) pairs of a context's node by scanning only its
    distinct continuations (heapq.nlargest; most frequent first, then the smaller id)."""
    import heapq

    return heapq.nlargest(r, counts.items(), key=lambda kv: (kv[1], -kv[0]))


def top_r_vocab_scan(counts: dict[int, int], r: int, vocab_size: int) -> list[tuple[int, int]]:
    """The authors' variant: the r best (next id, count) pairs by scanning every id v in range(|V|)
    and looking its count up in the node (0 if absent); a sorted list of the best r so far, where a
    later (larger) id displaces an entry only with a larger count (ties: the smaller id first)."""
    get = counts.get
    top: list[tuple[int, int]] = []  # (id, count), most frequent first, then the smaller id
    worst = 0  # an id enters if its count beats this: the r-th best count once r are held, else 0
    for v in range(vocab_size):
        c = get(v, 0)
        if c > worst:
            j = len(top)
            while j and top[j - 1][1] < c:
                j -= 1
            top.insert(j, (v, c))
            if len(top) > r:
                top.pop()
            if len(top) == r:
                worst = top[-1][1]
    return top


TRIE_TOP_R: dict[str, TopR] = {"strict": top_r_continuations, "literal": top_r_vocab_scan}


def trie_rows(root: dict, tokens: list[int], n: int, r: int, vocab_size: int, top_r: TopR) -> tuple[Any, Any]:
    """Per position: walk the trie to the context's node and take its top r with ``top_r``;
    probability count / context count (the sum of the node's counts). The row is computed at a
    context's first position, cached on the node's id for its later positions (the authors' scan is
    per context) and copied into the (N, r) outputs."""
    import numpy as np

    from slm_cli.ngram.build import id_dtype

    m, total = n - 1, len(tokens)
    ids = np.zeros((total, r), dtype=id_dtype(vocab_size))
    probs = np.zeros((total, r), dtype=np.float32)
    rows: dict[int, tuple] = {}
    for i in range(m, total):
        node = root
        for t in tokens[i - m : i]:
            node = node[t]
        row = rows.get(id(node))
        if row is None:
            context_count = sum(node.values())
            top = top_r(node, r, vocab_size)
            row_ids, row_probs = np.zeros(r, ids.dtype), np.zeros(r, np.float32)
            row_ids[: len(top)] = [v for v, _ in top]
            row_probs[: len(top)] = [c / context_count for _, c in top]  # float64 division, then float32
            row = rows[id(node)] = (row_ids, row_probs)
        ids[i] = row[0]
        probs[i] = row[1]
    return ids, probs


def trie_build(tokens: list[int], n: int, r: int, vocab_size: int, scan: str = "strict") -> tuple[Any, Any]:
    """A pure-Python port of the authors' count-trie builder (their release is C): the same rows as
    `build_ngram` (top r next ids by count, ties smaller id first; probability count / context count).

    1. Count (`count_trie`): a trie of dict nodes, one level per context token; the node of a
       context (depth n−1) holds the counts of its next tokens (next id -> count).
    2. Rows (`trie_rows`): per position, a walk to the context's node and its top r, computed once
       per context and cached. ``scan`` picks how the top r are found:
       - ``"literal"`` (the authors' design): every id v in range(|V|) is looked up in the node,
         an O(|V|) scan per context (`top_r_vocab_scan`);
       - ``"strict"`` (faster than the authors'): only the node's distinct continuations are
         scanned, heapq.nlargest over its (next id, count) pairs (`top_r_continuations`).
    """
    return trie_rows(count_trie(tokens, n), tokens, n, r, vocab_size, TRIE_TOP_R[scan])
