"""Instance-level selection: which windows of a micro-batch go through the full forward and backward.

The hierarchical form of ESLM (ESLM with hierarchical batch selection, the authors' later version of
arXiv 2505.19893) first scores whole sequences with a shallow pass and trains only on the riskiest,
then selects tokens inside them. Here a window's score comes from an **early exit** of the model
being trained: the first ``exit_layer`` blocks, then the final LayerNorm and the tied LM head, with
no parameters of its own and no gradient, read at ``score_positions`` evenly spaced positions of
the window; the score is the mean per-token loss (or entropy) over them. The strategy keeps windows
by value-at-risk over the micro-batch's windows (:meth:`Selection.select_windows`), and the kept
rows form a smaller micro-batch on which the usual token-level selection and loss run.

Why a sample of positions: attention needs the trunk on every position, but the head only where a
score is read, and with GPT-2's 50k vocabulary the head's forward (2·d·Vp per position) costs more
than a small trunk. Scoring P of T positions cuts the early exit's head cost by T/P; the estimate's
spread against the full-window mean is measured in docs/flops.md.

Every micro-batch keeps the same number of windows, so shapes are equal on every device and the
step does not depend on how the global batch is split (slm_cli/selection/scope.py, micro_batch).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from slm_cli.loss import Workspace, model_token_stats
from slm_cli.selection.base import Selected, Selection


def score_positions(block_size: int, count: int | None) -> Tensor:
    """``count`` evenly spaced positions of a window of ``block_size`` (all when count is None or
    not smaller): position ⌊(j + ½)·T/P⌋ for j < P, the centres of P equal strata."""
    if count is None or count >= block_size:
        return torch.arange(block_size)
    return ((torch.arange(count, dtype=torch.float64) + 0.5) * block_size / count).floor().long()


def exit_positions(selection: Selection, block_size: int) -> Tensor | None:
    """The positions the strategy's early exit reads in every window; None without instance selection."""
    return None if selection.exit_layer is None else score_positions(block_size, selection.score_positions)


@torch.no_grad()
def window_features(model: nn.Module, batch: Mapping[str, Tensor], selection: Selection, positions: Tensor, *,
                    chunk_size: int, workspace: Workspace | None = None) -> dict[str, Tensor]:
    """(B,) per-window features from the early exit: mean loss, and mean entropy when the strategy
    ranks by it, over ``positions`` of each window."""
    ids = batch["input_ids"]
    stats = model_token_stats(model, ids, batch["labels"], entropy=selection.needs_entropy, chunk_size=chunk_size,
                              workspace=workspace, exit_layer=selection.exit_layer,
                              positions=positions.to(ids.device))
    rows = ids.shape[0]
    features = {"loss": stats.loss.view(rows, -1).mean(1)}
    if stats.entropy is not None:
        features["entropy"] = stats.entropy.view(rows, -1).mean(1)
    return features


def keep_windows(batch: Mapping[str, Tensor], selected: Selected) -> dict[str, Tensor]:
    """The micro-batch restricted to the kept windows (rows in their original order)."""
    rows = selected.mask.nonzero().squeeze(1)
    return {key: value.index_select(0, rows.to(value.device)) for key, value in batch.items()}
