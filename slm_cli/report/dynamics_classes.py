"""The classes of `slm dynamics` (slm_cli/report/dynamics.py): per token, the least-squares line
of its loss across checkpoints, and its class by RHO-1's rule (Lin et al. 2024, arXiv 2404.07965,
Fig. 2 and Appendix B); see dynamics.py's module doc for the rule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from slm_cli.errors import SlmError

CLASSES = ("H→H", "L→H", "H→L", "L→L")
# RHO-1, Fig. 2(a): TinyLlama-1B, 15B OpenWebMath tokens, a ~320k-token validation set.
PAPER_SHARES = {"H→H": 0.11, "L→H": 0.12, "H→L": 0.26, "L→L": 0.51}
MEANING = {"H→H": "high loss throughout", "L→H": "loss rose", "H→L": "loss fell", "L→L": "low loss throughout"}
RULES = ("paper", "levels")


def fit_lines(x: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(slope, intercept) per column of ``losses`` (K, N): the least-squares line through
    (x_k, losses[k, j]) in float64, in closed form (x centred: no cancellation for large steps)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    xc = x - x.mean()
    slope = xc @ (y - y.mean(axis=0)) / (xc @ xc)
    intercept = y.mean(axis=0) - slope * x.mean()
    return slope, intercept


@dataclass
class Classes:
    labels: np.ndarray  # (N,) int: an index into CLASSES
    start: np.ndarray  # (N,) the fitted loss at the first checkpoint
    end: np.ndarray  # (N,) ... at the last
    slope: np.ndarray  # (N,) per unit of x
    threshold: float  # the H/L level used (nats)


def classify(x: np.ndarray, losses: np.ndarray, rule: str = "paper", trend: float = 0.2,
             high_loss: float | None = None) -> Classes:
    """Each token's class from its losses (K checkpoints × N tokens) at x (see the module doc)."""
    slope, intercept = fit_lines(x, losses)
    start, end = slope * float(x[0]) + intercept, slope * float(x[-1]) + intercept
    last = np.asarray(losses[-1], dtype=np.float64)
    threshold = float(last.mean()) if high_loss is None else float(high_loss)
    if rule == "paper":
        delta = end - start
        labels = np.where(last > threshold, CLASSES.index("H→H"), CLASSES.index("L→L"))
        labels = np.where(delta > trend, CLASSES.index("L→H"), labels)
        labels = np.where(delta < -trend, CLASSES.index("H→L"), labels)
    elif rule == "levels":
        high_start, high_end = start > threshold, end > threshold
        names = {(True, True): "H→H", (False, True): "L→H", (True, False): "H→L", (False, False): "L→L"}
        labels = np.array([CLASSES.index(names[(bool(a), bool(b))]) for a, b in zip(high_start, high_end, strict=True)],
                          dtype=np.int64)
    else:
        raise SlmError(f"rule={rule} is not known: use one of {', '.join(RULES)}")
    return Classes(labels=labels.astype(np.int64), start=start, end=end, slope=slope, threshold=threshold)


def shares(classes: Classes) -> dict[str, dict[str, Any]]:
    n = len(classes.labels)
    counts = np.bincount(classes.labels, minlength=len(CLASSES))
    return {c: {"tokens": int(counts[i]), "share": float(counts[i] / n), "paper_share": PAPER_SHARES[c]}
            for i, c in enumerate(CLASSES)}


def class_means(losses: np.ndarray, labels: np.ndarray) -> dict[str, list[float] | None]:
    """Each class's mean loss at each checkpoint (None for an empty class)."""
    return {c: (losses[:, labels == i].astype(np.float64).mean(axis=1).tolist() if (labels == i).any() else None)
            for i, c in enumerate(CLASSES)}
