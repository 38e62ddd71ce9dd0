"""The LightningModule: wires model, loss, selection and FLOPs accounting; owns no formula.

One optimizer step per batch: the batch holds `accumulate_grad_batches` micro-batches of
`data.batch_size` windows, and training_step runs them itself (manual optimization). Doing the
accumulation here, rather than in Lightning, keeps every micro-batch of a step in one place, which
is where a selection over the whole step (selection.scope=global) belongs.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from slm_cli import flops, optim
from slm_cli.errors import SlmError
from slm_cli.loss import TokenStats, token_stats, weighted_loss
from slm_cli.model.gpt import GPT, GPTConfig
from slm_cli.selection.base import Selected, Selection
from slm_cli.targets.base import Target
from slm_cli.targets.onehot import OneHot

CHECKPOINT_FORMAT = 1
COUNTERS = ("train_tokens", "selected_tokens", "flops_nominal", "flops_realized", "flops_clm")


@dataclass
class StepOutput:
    """What the LM head returns for one micro-batch (inside the model's forward)."""

    loss: Tensor  # differentiable: sum_j w_j * CE_j with w = mask / |S|
    stats: TokenStats
    selected: Selected


class SLMModule(L.LightningModule):
    def __init__(
        self,
        model: GPTConfig,
        optim_cfg: Any,
        selection: Selection,
        *,
        target: Target | None = None,
        max_steps: int,
        accumulate_grad_batches: int = 1,
        chunk_size: int = 1024,
        keep_probs: bool = True,
        tokenizer_json: str = "",
        run_config: dict | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.model_config = model
        self.model = GPT(model)
        self.optim_cfg = optim_cfg
        self.selection = selection
        self.target = target or OneHot()
        self.max_steps = max_steps
        self.accumulate = accumulate_grad_batches
        self.chunk_size = chunk_size
        self.keep_probs = keep_probs
        self.tokenizer_json = tokenizer_json
        self.run_config = run_config or {}
        self.counters: dict[str, float] = dict.fromkeys(COUNTERS, 0)
        self.flops_per_batch = 0.0  # read by lightning's ThroughputMonitor (realised FLOPs)
        self.train_seconds = 0.0  # time in training steps during this process (not restored)
        self.tokens_this_run = 0
        self.val_loss: float | None = None
        self.val_step: int | None = None  # global step of the latest validation
        self._val_sums: list[Tensor] = []

    # ---- training -------------------------------------------------------------------------
    def _head(self, labels: Tensor, batch: dict[str, Tensor]):
        """The loss as a head callable: GPT.forward hands it the final hidden states and the tied
        LM-head weight, so no B×T×V logits tensor is built outside the chunked loss."""

        def head(hidden: Tensor, weight: Tensor) -> StepOutput:
            h = hidden.reshape(-1, hidden.shape[-1])
            y = labels.reshape(-1)
            stats = token_stats(h.detach(), weight.detach(), y, chunk_size=self.chunk_size,
                                entropy=self.selection.needs_entropy, keep_probs=self.keep_probs)
            selected = self.selection.select(stats, batch)
            n = selected.mask.sum()
            weights = selected.mask.to(torch.float32) / n.clamp_min(1)
            loss = weighted_loss(h, weight, y, weights, stats, targets=self.target.targets(batch),
                                 chunk_size=self.chunk_size)
            return StepOutput(loss=loss, stats=stats, selected=selected)

        return head

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        t0 = time.perf_counter()
        opt = self.optimizers()
        sched = self.lr_schedulers()
        micro = [dict(zip(batch, parts, strict=True))
                 for parts in zip(*(v.chunk(self.accumulate) for v in batch.values()), strict=True)]
        loss_sum = torch.zeros((), device=self.device)
        loss_all_sum = torch.zeros((), device=self.device)
        n_tokens = torch.zeros((), device=self.device)
        n_selected = torch.zeros((), device=self.device)
        sel_metrics: dict[str, float] = {}
        for mb in micro:
            out: StepOutput = self.model(mb["input_ids"], head=self._head(mb["labels"], mb))
            if not torch.isfinite(out.loss):
                raise SlmError(self._diverged(f"training loss became {out.loss.item()}"))
            # Each micro-batch is a mean over its own selected tokens; the step averages them.
            self.manual_backward(out.loss / self.accumulate)
            loss_sum += out.loss.detach()
            loss_all_sum += out.stats.loss.sum()
            n_tokens += out.stats.loss.numel()
            n_selected += out.selected.mask.sum()
            sel_metrics = out.selected.metrics
        grad_norm = optim.clip(list(self.model.parameters()), self.optim_cfg.grad_clip)
        if not torch.isfinite(grad_norm):  # stop before the update, so checkpoints stay finite
            raise SlmError(self._diverged(f"gradient norm became {grad_norm.item()}"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        lr = sched.get_last_lr()[0]
        sched.step()

        # Global counts (summed over data-parallel ranks) so counters and FLOPs describe the run.
        counts = self.trainer.strategy.reduce(torch.stack([n_tokens, n_selected, loss_all_sum]), reduce_op="sum")
        tokens, selected = int(counts[0]), int(counts[1])
        step = flops.step_flops(self.model_config, tokens, selected, keep_probs=self.keep_probs,
                                extra_forward=self.selection.extra_forward_flops(tokens))
        self.flops_per_batch = step.realized / self.trainer.world_size
        self.counters["train_tokens"] += tokens
        self.counters["selected_tokens"] += selected
        self.counters["flops_nominal"] += step.nominal
        self.counters["flops_realized"] += step.realized
        self.counters["flops_clm"] += step.clm

        train_loss = loss_sum / self.accumulate
        metrics = {
            "train/loss_all": counts[2] / counts[0],
            "train/selected_frac": selected / tokens,
            "train/grad_norm": grad_norm,
            "lr": lr,
            "flops/nominal": self.counters["flops_nominal"],
            "flops/realized": self.counters["flops_realized"],
            "flops/saved_frac": flops.saved_frac(self.counters["flops_nominal"], self.counters["flops_clm"]),
        }
        metrics.update({f"selection/{k}": v for k, v in sel_metrics.items()})
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=tokens)
        self.log("train/loss", train_loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=tokens)
        self.tokens_this_run += tokens
        self.train_seconds += time.perf_counter() - t0

    def _diverged(self, what: str) -> str:
        callback = self.trainer.checkpoint_callback
        last = Path(callback.dirpath) / "last.ckpt" if callback is not None and callback.dirpath else None
        kept = f"the last good checkpoint is {last}" if last and last.is_file() else "no checkpoint was written"
        return (f"{what} at step {self.global_step}: lower optim.lr (now {self.optim_cfg.lr}) or raise "
                f"optim.warmup_steps; {kept}")

    # ---- validation: mean loss over all tokens of the validation windows ----------------------
    def on_validation_epoch_start(self) -> None:
        self._val_sums = []

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        def head(hidden: Tensor, weight: Tensor) -> Tensor:
            h = hidden.reshape(-1, hidden.shape[-1])
            stats = token_stats(h, weight, batch["labels"].reshape(-1), chunk_size=self.chunk_size,
                                keep_probs=False)
            return torch.stack([stats.loss.double().sum(), torch.tensor(float(h.shape[0]), dtype=torch.float64)])

        self._val_sums.append(self.model(batch["input_ids"], head=head))

    def on_validation_epoch_end(self) -> None:
        if not self._val_sums:
            return
        total = self.trainer.strategy.reduce(torch.stack(self._val_sums).sum(0), reduce_op="sum")
        val_loss = float(total[0] / total[1])
        if self.trainer.sanity_checking:
            return
        self.val_loss, self.val_step = val_loss, self.global_step
        self.log_dict({"val/loss": val_loss, "val/ppl": math.exp(min(val_loss, 700.0))}, prog_bar=True)

    # ---- optimizer --------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        opt, sched = optim.build(self.model.param_groups(self.optim_cfg.weight_decay), self.optim_cfg,
                                 self.optim_cfg.decay_steps or self.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- checkpoints carry what is needed to resume exactly and to evaluate alone -------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["slm"] = {
            "format_version": CHECKPOINT_FORMAT,
            "model": asdict(self.model_config),
            "tokenizer_json": self.tokenizer_json,
            "counters": dict(self.counters),
            "selection": {"name": self.selection.name, "state": self.selection.state_dict()},
            "torch_rng": torch.get_rng_state(),
            "val_loss": self.val_loss,
            "config": self.run_config,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["slm"]
        self.counters.update(state["counters"])
        self.selection.load_state_dict(state["selection"]["state"])
        torch.set_rng_state(state["torch_rng"])
        self.val_loss = state.get("val_loss")
