"""Training and validation samples: fixed-length windows over a flat token stream.

A training sample is identified by its *global sample index*; its window start is a stateless hash
of (seed, index). Step ``s`` of training always consumes the same global indices, whatever the
number of devices, so a run is reproducible and resumable from the step counter alone.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from slm_cli.errors import SlmError

_U64 = 0xFFFFFFFFFFFFFFFF
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-mixing hash of uint64 values (wraps mod 2**64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def check_length(n_tokens: int, block_size: int, what: str) -> None:
    if n_tokens < block_size + 1:
        raise SlmError(
            f"{what} has {n_tokens:,} tokens, fewer than model.block_size + 1 = {block_size + 1:,}: "
            "lower model.block_size or use a larger corpus (or a larger data.val_fraction for val)"
        )


def sample_starts(seed: int, indices: np.ndarray, n_tokens: int, block_size: int,
                  grid: int | None = None) -> np.ndarray:
    """Window start for each global sample index: ``hash(seed, i) mod (n_tokens - block_size)``.

    With ``grid`` = C, starts lie on multiples of C whose whole C-token window fits, ``k·C`` with
    ``k = hash(seed, i) mod #slots``: the windows `slm score` scores on that grid, so that a
    stored per-token value was computed from exactly the context the training window gives."""
    check_length(n_tokens, max(block_size, grid or 0), "the token stream")
    idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
    key = _mix64(np.array([seed & _U64], dtype=np.uint64))
    # The i-th output of a splitmix64 generator seeded with the mixed seed.
    h = _mix64(key + (idx + np.uint64(1)) * _GOLDEN)
    if grid is None:
        return (h % np.uint64(n_tokens - block_size)).astype(np.int64)
    slots = (n_tokens - 1 - max(block_size, grid)) // grid + 1
    return (h % np.uint64(slots)).astype(np.int64) * grid


Span = tuple[str, int, int]  # a mixture source's (name, start, end) in the token stream


def draw_sources(seed: int, indices: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """The mixture source of each global sample index, a pure function of (seed, index).

    Index i gets the point ``u_i = frac(key(seed) + i·φ)`` of the golden-ratio Weyl sequence (in 64-bit
    fixed point) and the source whose share of [0, 1) (cumulative normalised weights) holds it. The
    sequence is low-discrepancy: in any run of N consecutive indices (a step's global batch, one rank's
    slice of it) source s gets N·w_s windows up to O(log N), not ±√N as with independent draws."""
    w = np.asarray(weights, dtype=np.float64)
    edges = np.cumsum(w / w.sum())
    idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
    key = _mix64(np.array([(seed ^ 0x5EED50C5) & _U64], dtype=np.uint64))
    u = ((key + idx * _GOLDEN) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return np.minimum(np.searchsorted(edges, u, side="right"), len(w) - 1)


def span_slots(start: int, end: int, block_size: int, grid: int | None) -> tuple[int, int, int]:
    """(first start, step, count) of the window starts inside a span [start, end): every position
    whose block_size + 1 tokens fit, or with ``grid`` the multiples of it whose whole grid window fits
    (as sample_starts, so a stored per-token value was computed on the window training gives)."""
    if grid is None:
        return start, 1, max(end - start - block_size, 0)
    first = -(-start // grid) * grid
    return first, grid, max((end - 1 - max(block_size, grid) - first) // grid + 1, 0)


def mixture_starts(seed: int, indices: np.ndarray, spans: Sequence[Span], weights: Sequence[float],
                   block_size: int, grid: int | None = None) -> np.ndarray:
    """Window start for each global sample index of a mixture: the source from :func:`draw_sources`,
    then a start inside that source's span (never crossing its end), drawn as in sample_starts."""
    idx = np.asarray(indices, dtype=np.int64)
    source = draw_sources(seed, idx, weights)
    key = _mix64(np.array([seed & _U64], dtype=np.uint64))
    h = _mix64(key + (idx.astype(np.uint64) + np.uint64(1)) * _GOLDEN)
    starts = np.empty(len(idx), dtype=np.int64)
    for s, (_, a, b) in enumerate(spans):
        first, step, count = span_slots(a, b, block_size, grid)
        rows = source == s
        starts[rows] = first + (h[rows] % np.uint64(count)).astype(np.int64) * step
    return starts


def _check_spans(spans: Sequence[Span], n_tokens: int, block_size: int, grid: int | None, split: str) -> None:
    ends = [a for _, a, _ in spans[1:]] + [n_tokens]
    if not spans or spans[0][1] != 0 or any(b != e for (_, _, b), e in zip(spans, ends, strict=True)):
        raise SlmError(f"the mixture's {split} spans {[tuple(s) for s in spans]} do not tile its {n_tokens:,} "
                       "tokens: delete the prepared folder's meta.json and prepare again")
    for name, a, b in spans:
        if span_slots(a, b, block_size, grid)[2] < 1:
            need = max(block_size, grid or 0) + 1 + (grid or 0)
            raise SlmError(f"mixture source {name!r} has {b - a:,} {split} tokens, too few for one window "
                           f"of model.block_size + 1 = {block_size + 1:,}{f' on the grid of {grid}' if grid else ''}"
                           f" (about {need:,}): lower model.block_size, or raise the source's max_bytes"
                           " (or its val_fraction for val)")


def _check_token_arrays(token_arrays: dict[str, np.ndarray] | None, n_tokens: int) -> dict[str, np.ndarray]:
    for name, array in (token_arrays or {}).items():
        if len(array) != n_tokens:
            raise SlmError(
                f"per-token array {name!r} has {len(array):,} rows but the token stream has {n_tokens:,}: "
                "recompute it for this prepared data"
            )
    return dict(token_arrays or {})


def _windows(
    tokens: np.ndarray, starts: np.ndarray, block_size: int, token_arrays: dict[str, np.ndarray]
) -> dict[str, torch.Tensor]:
    """Batched windows at ``starts``: one fancy-index gather per array (reads only those pages of a memmap)."""
    pos = starts[:, None] + np.arange(block_size + 1, dtype=np.int64)
    window = np.asarray(tokens[pos]).astype(np.int64)
    positions = pos[:, 1:]
    batch = {
        "input_ids": torch.from_numpy(window[:, :-1].copy()),
        "labels": torch.from_numpy(window[:, 1:].copy()),
        "positions": torch.from_numpy(positions.copy()),
    }
    for name, array in token_arrays.items():
        batch[name] = torch.from_numpy(np.ascontiguousarray(array[positions]))
    return batch


class TrainWindows(Dataset):
    """Random windows addressed by global sample index; ``ds[indices]`` returns a whole (B, T) batch.

    ``positions`` are the stream positions of the labels, so per-token arrays (``token_arrays``) aligned with the
    stream (e.g. reference-model scores) are gathered for exactly the predicted tokens.
    """

    def __init__(
        self, tokens: np.ndarray, block_size: int, seed: int, token_arrays: dict[str, np.ndarray] | None = None,
        grid: int | None = None, spans: Sequence[Span] | None = None, weights: Sequence[float] | None = None,
    ) -> None:
        check_length(len(tokens), max(block_size, grid or 0), "the train split")
        self.tokens = tokens
        self.block_size = block_size
        self.seed = seed
        self.grid = grid  # see sample_starts
        self.token_arrays = _check_token_arrays(token_arrays, len(tokens))
        # A mixture (slm_cli/data/mixture.py): each window comes from one source's span, drawn with
        # its weight (mixture_starts); the same pure function of (seed, index), so resume stays exact.
        self.spans = list(spans) if spans else None
        self.weights = list(weights) if weights else None
        if self.spans:
            if self.weights is None or len(self.weights) != len(self.spans):
                raise ValueError("a mixture's spans need one weight each")
            _check_spans(self.spans, len(tokens), block_size, grid, "train")

    def __getitem__(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        indices = np.atleast_1d(indices)
        if self.spans:
            starts = mixture_starts(self.seed, indices, self.spans, self.weights, self.block_size, self.grid)
        else:
            starts = sample_starts(self.seed, indices, len(self.tokens), self.block_size, self.grid)
        return _windows(self.tokens, starts, self.block_size, self.token_arrays)


class StepSampler(Sampler):
    """Infinite sampler yielding, per optimizer step, this rank's slice of the global sample indices.

    The step's global batch is ``[s*G, (s+1)*G)`` with ``G = rows_per_step * world_size``, and rank
    ``r`` takes the ``r``-th contiguous slice, so the union over ranks never depends on world size.
    """

    def __init__(self, rows_per_step: int, start_step: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if rows_per_step < 1 or not 0 <= rank < world_size or start_step < 0:
            raise ValueError(f"bad sampler layout: {rows_per_step=}, {start_step=}, {rank=}, {world_size=}")
        self.rows_per_step = rows_per_step
        self.start_step = start_step
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[np.ndarray]:
        global_rows = self.rows_per_step * self.world_size
        for step in itertools.count(self.start_step):
            first = step * global_rows + self.rank * self.rows_per_step
            yield np.arange(first, first + self.rows_per_step, dtype=np.int64)


class ValWindows(Dataset):
    """Consecutive non-overlapping windows ``k * block_size`` over the val split (deterministic).

    With ``spans`` (a mixture), the windows run over each source's span from its start, up to
    ``max_windows`` per source, and each item carries its ``source`` (index into ``spans``)."""

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        max_windows: int | None = None,
        token_arrays: dict[str, np.ndarray] | None = None,
        spans: Sequence[Span] | None = None,
    ) -> None:
        check_length(len(tokens), block_size, "the val split")
        self.tokens = tokens
        self.block_size = block_size
        self.token_arrays = _check_token_arrays(token_arrays, len(tokens))
        self.spans = list(spans) if spans else None
        if self.spans:
            _check_spans(self.spans, len(tokens), block_size, None, "val")
        bounds = [(a, b) for _, a, b in self.spans] if self.spans else [(0, len(tokens))]
        counts = [(b - a - 1) // block_size for a, b in bounds]
        counts = counts if max_windows is None else [min(n, max_windows) for n in counts]
        self.first = np.array([a for a, _ in bounds], dtype=np.int64)  # each source's first window start
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # its first window index
        self.n_windows = int(self.offsets[-1])

    def __len__(self) -> int:
        return self.n_windows

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        """Window k, with ``weight`` 1; k = PAD gives window 0 with weight 0 (see ShardSampler)."""
        if not (0 <= k < self.n_windows or k == PAD):
            raise IndexError(f"window {k} out of range [0, {self.n_windows})")
        source = int(np.searchsorted(self.offsets, max(k, 0), side="right")) - 1
        start = self.first[source] + (max(k, 0) - self.offsets[source]) * self.block_size
        batch = _windows(self.tokens, np.array([start]), self.block_size, self.token_arrays)
        item = {name: value[0] for name, value in batch.items()}
        item["weight"] = torch.tensor(0.0 if k == PAD else 1.0)
        if self.spans:
            item["source"] = torch.tensor(source)
        return item


PAD = -1  # the index of a padding window, which counts with weight 0


class ShardSampler(Sampler):
    """Rank r's share of n windows: r, r + W, r + 2W, ..., padded with PAD to ⌈n/W⌉ on every rank.

    Every rank runs the same number of validation batches, which FSDP and DDP need (their forward
    holds collectives: a rank with one batch fewer would leave the others waiting forever); the
    padding windows carry weight 0, so the validation loss is the mean over the n real windows,
    whatever the number of devices.
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.rank, self.world_size = n, rank, world_size

    def __len__(self) -> int:
        return -(-self.n // self.world_size)

    def __iter__(self) -> Iterator[int]:
        for i in range(len(self)):
            k = self.rank + i * self.world_size
            yield k if k < self.n else PAD
