"""Knowledge distillation from a teacher: ESLM-KD (arXiv 2505.19893) with `selection=eslm target=kd`.

Each token is trained towards a mixture of its label and the teacher's next-token distribution,

    y_j = (1 − λ)·e_{x_j} + λ·q_j,      λ = target.weight,

where q_j is the teacher's distribution at temperature T, truncated to its top k (target.top_k):

    q^T_j = softmax(z^teacher_j / T)   over the tokenizer's vocabulary V (padded head rows cut),
    q_j   = Σ_{v ∈ top-k(q^T_j)} q^T_j[v]·e_v  +  (1 − Σ_{v ∈ top-k} q^T_j[v])·e_{x_j}.

**The mass outside the top k goes to the label** (our choice). Every row then sums to exactly 1
(so CE(y_j, p_j) = (1 − λ)·ℓ_j + λ·CE(q_j, p_j) is a proper cross-entropy and the KL reading holds
per row), and the teacher's top-k probabilities keep their true values. The alternatives:

- *renormalising the top k* (q^T/P_k on the top k) inflates them by 1/P_k: a hedging teacher
  (P_k = 0.3) becomes a confident one. If the labels follow the teacher, our rule's expectation
  gives the top k q^T·(1 + rest) and the tail q^T·rest, strictly closer to q^T than the
  renormalised q^T·(1 + rest/P_k) and 0;
- *CoCoNTs' indicator* (1[x_j ∉ top-k]·e_{x_j}, unbiased in expectation over positions) leaves
  rows summing to P_k or P_k + 1, and under a loss-based selection (ESLM keeps high-loss tokens,
  whose labels are disproportionately outside the top k) that expectation no longer holds
  (docs/methods.md, n-gram targets). ESLM-KD exists to be combined with selection.

Folded into the one-hot column, the row is (1 − λ + λ·rest)·e_{x_j} + λ·top-k: 1 + k (id,
probability) pairs per token. With top_k ≥ V (or null) there is no rest and no top-k cut: q_j is
the full teacher distribution q^T_j, exactly.

**Temperature.** Only the teacher is softened; the student's softmax is the model's own (T = 1),
and the loss is not multiplied by T². Hinton et al. soften the student too, which scales the
gradient of the KD term by 1/T (≈1/T² in the high-T limit), and T² restores its size. Here the
gradient w.r.t. the student's logits is p_j·Σy_j − y_j = p_j − y_j at every T, already of the
same size as the label term's; T² would only re-weight the KD term by T² against 1 − λ.

**The teacher** (target.teacher: an slm checkpoint, run dir or Hugging Face causal-LM folder, loaded
as a reference model by slm_cli/reference/models.py) runs frozen (eval mode, no_grad) on each
micro-batch's input_ids, on the micro-batch's device, so its context is exactly the student's
training window; it hands its logits over in row blocks (``with_logit_blocks``: an slm teacher
makes them block by block, so no (M, V) teacher logits exist at once). It costs its forward, 2·N_t + 4·L_t·T_t·d_t FLOPs per token, on
every token of every micro-batch whichever tokens the selection keeps: :meth:`KD.extra_forward_flops`
adds it to the nominal and realised FLOPs. Checks, the reference's own (named after target.teacher):
the data's tokenizer must be the teacher's (at :meth:`token_arrays`, before training); the teacher's
context must hold the training windows. A target does not see model.block_size before training, so
that check runs on every batch in :meth:`targets` (an int comparison) and fails on the first one,
in one line, as the online RHO-1 reference's does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from slm_cli.config import is_number, positive_int_or_null
from slm_cli.errors import SlmError
from slm_cli.loss import SparseTargets
from slm_cli.target.base import Target, check_weight, mix_with_onehot

if TYPE_CHECKING:
    from slm_cli.data.prepared import PreparedData
    from slm_cli.reference.models import ReferenceModel

# Rows of teacher logits turned into probabilities at once: a float32 (rows, V) block of ~64 MB.
BLOCK_FLOATS = 1 << 24


class KD(Target):
    name = "kd"

    def __init__(self, name: str = "kd", teacher: str | None = None, top_k: int | None = 64,
                 temperature: float = 1.0, weight: float = 0.5) -> None:
        self.name = name
        self.weight = check_weight(weight)
        top_k = positive_int_or_null("target.top_k", top_k, example=64)
        if not (is_number(temperature) and temperature > 0):
            raise SlmError(f"target.temperature={temperature} must be a positive number: e.g. "
                           "target.temperature=2 (1 is the teacher's own distribution)")
        self.temperature = float(temperature)
        if teacher is None or str(teacher).strip() in ("", "???"):
            raise SlmError("target=kd needs a teacher: pass target.teacher=<slm checkpoint, run dir or Hugging Face "
                           "GPT-2 folder> that uses the data's tokenizer")
        from slm_cli.reference.models import load

        self.teacher: ReferenceModel = load(str(teacher), key="target.teacher")
        vocab = self.teacher.vocab_size
        self.top_k = vocab if top_k is None else min(top_k, vocab)  # k ≥ V is the whole distribution

    def token_arrays(self, prepared: PreparedData) -> dict[str, np.ndarray]:
        """No arrays: the teacher runs on the batch. Checked here, once before training: the
        teacher's distribution is over the data's token ids only if it shares the tokenizer."""
        self.teacher.check_data(prepared)
        return {}

    def max_entries(self) -> int:
        return 1 + self.top_k  # the label's column (which also carries the rest), then the top k

    def extra_forward_flops(self, tokens: int) -> float:
        # λ = 0 is plain CLM: the teacher does not run, so it costs nothing.
        return 0.0 if self.weight == 0 else tokens * self.teacher.forward_flops_per_token

    def targets(self, batch: Mapping[str, Tensor]) -> SparseTargets | None:
        if self.weight == 0:  # λ = 0 is CLM exactly: the one-hot path, not a soft target of mass 0
            return None
        labels = batch["labels"]
        ids, probs = self.teacher_top_k(batch["input_ids"], labels.device)
        targets = mix_with_onehot(labels, ids, probs, self.weight)
        if self.top_k < self.teacher.vocab_size:
            # The teacher's mass outside its top k goes to the label (module docstring).
            rest = (1.0 - probs.sum(-1)).clamp_min(0.0)
            targets.probs[:, 0] += self.weight * rest
        return targets

    @torch.no_grad()
    def teacher_top_k(self, input_ids: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
        """Flat (M, k) ids and probabilities of the teacher's top k at temperature T, on ``device``."""
        t = self.teacher
        t.check_context(input_ids.shape[1])
        if t.device != device:
            t.to(device)  # once: the teacher stays where the micro-batches are
        return t.with_logit_blocks(input_ids.to(device), self._top_k)

    def _top_k(self, rows: int, block: Callable[[slice], Tensor]) -> tuple[Tensor, Tensor]:
        vocab, k = self.teacher.vocab_size, self.top_k
        probs = torch.empty(rows, k, dtype=torch.float32, device=self.teacher.device)
        ids = torch.empty(rows, k, dtype=torch.long, device=probs.device) if k < vocab else None
        step = max(1, BLOCK_FLOATS // vocab)
        for s in range(0, rows, step):
            r = slice(s, s + step)
            q = torch.softmax(block(r).float() / self.temperature, dim=-1)
            if ids is None:
                probs[r] = q  # the whole distribution: no top-k cut, no rest
            else:
                top = q.topk(k, dim=-1, sorted=False)
                probs[r], ids[r] = top.values, top.indices
            del q
        if ids is None:
            ids = torch.arange(vocab, device=probs.device).expand(rows, vocab)
        return ids, probs

