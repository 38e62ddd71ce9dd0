"""n-gram keys: the n ids of an n-gram packed into one uint64, ``bits`` = ceil(log2 V) bits per id
(x_{i−n+1} in the high bits, x_i in the low ones), so n·bits ≤ 64. Counting (slm_cli/ngram/
build.py) sorts these keys; AllNTs (slm_cli/target/allnts.py) looks contexts up by them.
"""

from __future__ import annotations

import numpy as np

from slm_cli.errors import SlmError

KEY_BITS = 64


def bits_per_token(vocab_size: int) -> int:
    """Bits that hold every id below ``vocab_size`` (ceil(log2 V), at least 1)."""
    return max(1, (int(vocab_size) - 1).bit_length())


def check_key_width(n: int, vocab_size: int) -> int:
    """Bits per id of the packed n-gram key; refuses (n, V) whose key would not fit 64 bits."""
    bits = bits_per_token(vocab_size)
    if n * bits > KEY_BITS:
        raise SlmError(
            f"ngram.n={n} with vocabulary {vocab_size} needs {n * bits}-bit n-gram keys ({bits} bits per token) "
            f"but keys are {KEY_BITS}-bit: use ngram.n<={KEY_BITS // bits} for this vocabulary"
        )
    return bits


def pack(tokens: np.ndarray, start: int, stop: int, n: int, bits: int) -> np.ndarray:
    """Keys of the n-grams ending at positions [start, stop) (start ≥ n−1): x_{i−n+1} in the high
    bits, x_i in the low ``bits``. The context key of position i is ``key >> bits``."""
    window = np.asarray(tokens[start - n + 1 : stop]).astype(np.uint64)
    m = stop - start
    key = window[:m].copy()
    for k in range(1, n):
        key <<= np.uint64(bits)
        key |= window[k : k + m]
    return key


def pack_context(tokens: np.ndarray, start: int, stop: int, n: int, bits: int) -> np.ndarray:
    """Context keys (the n−1 tokens before) of positions [start, stop), start ≥ n−1."""
    return pack(tokens, start - 1, stop - 1, n - 1, bits)  # the (n−1)-gram ending at i−1


def context_keys_at(tokens: np.ndarray, positions: np.ndarray, n: int, bits: int) -> np.ndarray:
    """Context keys of arbitrary ``positions``, as :func:`pack_context` packs them. Positions
    below n−1 have an incomplete context: their keys are meaningless and the caller masks them."""
    key = np.zeros(len(positions), dtype=np.uint64)
    for k in range(1, n):  # x_{j−n+1} … x_{j−1}, oldest token in the high bits
        key = (key << np.uint64(bits)) | tokens[np.maximum(positions - n + k, 0)].astype(np.uint64)
    return key
