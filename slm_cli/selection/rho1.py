"""RHO-1 Selective Language Modeling (Lin et al. 2024, arXiv 2404.07965).

A reference model trained on curated data scores every token; the model trains only on the top
``ratio`` of each micro-batch's tokens (or global batch's, trainer.selection_scope=global_batch) by

- ``excess`` (the paper's method): Δ_j = ℓ_j − ℓ^ref_j, signed. Tokens the reference finds easy
  but the model does not yet predict are the learnable ones; noise has a high ℓ^ref and a low Δ.
- ``reference_loss``: −ℓ^ref_j, the tokens the reference finds easiest;
- ``reference_entropy``: −H^ref_j, the tokens the reference is most certain about.

The two reference-only variants are *our reading* of the paper's ablations (select by reference
loss or entropy alone); both keep the low end, where the reference deems a token clean.

Reference statistics come either precomputed by `slm score` (stored beside train.bin and gathered
into each batch as ``ref_loss`` / ``ref_entropy``; no cost during training) or from the reference
run online on every micro-batch, which costs 2·N_ref FLOPs per token and is counted as such.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from slm_cli.errors import SlmError
from slm_cli.loss import TokenStats
from slm_cli.selection.base import Selected, Selection, check_choice, check_fraction, keep_count, top_k_mask

if TYPE_CHECKING:
    from slm_cli.data.prepared import PreparedData
    from slm_cli.reference.models import ReferenceModel

SCORES = ("excess", "reference_loss", "reference_entropy")
MODES = ("precomputed", "online")


class Rho1(Selection):
    name = "rho1"

    def __init__(
        self,
        name: str = "rho1",
        ratio: float = 0.6,
        score: str = "excess",
        reference: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.ratio = check_fraction("selection.ratio", ratio)
        self.score = check_choice("selection.score", score, SCORES)
        ref = dict(reference or {})
        self.mode = check_choice("selection.reference.mode", ref.get("mode", "precomputed"), MODES)
        self.path = ref.get("path")
        self.ref_name = ref.get("name")
        self.ckpt_path = ref.get("ckpt_path")
        # Only the excess loss reads the model being trained; the reference-only scores select
        # from the batch alone, so no scoring pass is ever needed for them (scope.py).
        self.reads_model = self.score == "excess"
        self.reference: ReferenceModel | None = None
        self.scores_meta: dict[str, Any] = {}
        if self.mode == "online":
            if not self.ckpt_path:
                raise SlmError("selection.reference.mode=online needs the reference model: pass "
                               "selection.reference.ckpt_path=<slm checkpoint or Hugging Face folder>")
            from slm_cli.reference.models import load

            self.reference = load(str(self.ckpt_path), key="selection.reference.ckpt_path")

    def token_arrays(self, prepared: PreparedData) -> dict[str, np.ndarray]:
        if self.reference is not None:
            self.reference.check_data(prepared)
            return {}
        from slm_cli.reference.scores import load_scores_and_meta

        scores, self.scores_meta = load_scores_and_meta(prepared, path=self.path, name=self.ref_name)
        # ref_loss is always logged; the entropy array is only read when it is the score.
        keys = ("ref_loss", "ref_entropy") if self.score == "reference_entropy" else ("ref_loss",)
        return {key: scores[key] for key in keys}

    def window_grid(self, block_size: int) -> int | None:
        """Precomputed scores compare like with like only if training windows are the scored
        windows (the paper scores both models on the same sample): `slm score`'s grid of
        non-overlapping windows of `context` tokens, with model.block_size ≤ context."""
        if self.reference is not None:
            return None  # online: the reference scores the training window itself
        meta = self.scores_meta
        context, stride, ref = int(meta["context"]), int(meta["stride"]), meta["reference"]
        if stride != context:
            raise SlmError(f"reference losses were scored with sliding windows (context={context}, stride={stride}), "
                           "so their contexts differ from the training windows': run `slm score data=<same data> "
                           f"ckpt_path={ref} context={block_size} stride={block_size}` (a grid, the default)")
        if block_size != context:
            # A training window starts on the grid and holds block_size labels: shorter windows
            # would never train the labels past block_size in each scored window, longer ones
            # would read scores computed in another context.
            what = "longer" if block_size > context else "shorter"
            raise SlmError(f"model.block_size={block_size} is {what} than the reference's scoring windows "
                           f"({context} tokens), so training windows would not be the scored ones: run `slm score "
                           f"data=<same data> ckpt_path={ref} context={block_size}`, or set model.block_size={context}")
        return context

    def scoring_flops(self) -> float:
        """The reference's forward work over the corpus by `slm score` (0 if its meta predates the count)."""
        return float(self.scores_meta.get("flops", 0.0))

    def extra_forward_flops(self, tokens: int) -> float:
        return 0.0 if self.reference is None else tokens * self.reference.forward_flops_per_token

    def _reference_stats(self, batch: Mapping[str, Tensor], device: torch.device) -> tuple[Tensor, Tensor | None]:
        """Flat (M,) reference loss and, when it is the score, entropy."""
        if self.reference is not None:
            ref = self.reference
            ref.check_context(batch["input_ids"].shape[1])
            if ref.device != device:
                ref.to(device)
            loss, entropy = ref.token_stats(batch["input_ids"], batch["labels"])
            return loss.reshape(-1).float(), entropy.reshape(-1).float()
        if "ref_loss" not in batch:
            raise SlmError("selection=rho1 found no ref_loss in the batch: reference losses are loaded by "
                           "Rho1.token_arrays(prepared) before training")
        entropy = batch.get("ref_entropy")
        return (batch["ref_loss"].reshape(-1).to(device, torch.float32),
                None if entropy is None else entropy.reshape(-1).to(device, torch.float32))

    def features(self, stats: TokenStats | None, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        # The reference runs (online) or is read (precomputed) where the micro-batch is; only
        # these flat values travel when the selection is global.
        ref_loss, ref_entropy = self._reference_stats(batch, (stats.loss if stats is not None else batch["input_ids"]).device)
        feats = {"ref_loss": ref_loss}
        if stats is not None:
            feats["loss"] = stats.loss
        if self.score == "reference_entropy":
            feats["ref_entropy"] = ref_entropy
        return feats

    def select(self, features: Mapping[str, Tensor]) -> Selected:
        ref_loss = features["ref_loss"]
        if self.score == "excess":
            scores = features["loss"] - ref_loss
        elif self.score == "reference_loss":
            scores = -ref_loss
        else:
            scores = -features["ref_entropy"]
        mask, threshold = top_k_mask(scores, keep_count(self.ratio, scores.numel()))
        return Selected(mask=mask, metrics={"threshold": threshold, "ref_loss": float(ref_loss.mean())})

    def keep_fraction(self) -> float:
        return self.ratio
