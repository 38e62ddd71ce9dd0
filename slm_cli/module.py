"""The LightningModule: wires model, loss, selection and FLOPs accounting; owns no formula.

One optimizer step per batch: the batch holds `accumulate_grad_batches` micro-batches of
`data.batch_size` windows, and training_step runs them itself (manual optimization). Doing the
accumulation here, rather than in Lightning, keeps every micro-batch of a step in one place, which
is where a selection over the whole step belongs.

Where the strategy selects (selection.scope: the global batch or one micro-batch) is planned by
slm_cli/selection/scope.py; this module only runs the micro-batches through it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from slm_cli import distributed, flops, optim
from slm_cli.errors import SlmError
from slm_cli.loss import Workspace, perplexity, token_stats, weighted_loss
from slm_cli.model.gpt import GPT, GPTConfig
from slm_cli.selection.base import Selection
from slm_cli.selection.scope import Devices, Planner, StepSelection
from slm_cli.target.base import Target
from slm_cli.target.onehot import OneHot

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
COUNTERS = ("train_tokens", "selected_tokens", "flops_nominal", "flops_realized", "flops_clm")


@dataclass
class MicroOutput:
    """What the LM head reports for one micro-batch, beside its differentiable loss."""

    token_loss: Tensor  # (M,) per-token CE, detached (logged as train/loss_all)
    selected: Tensor  # () number of this micro-batch's tokens with nonzero weight
    features: dict[str, Tensor]  # the strategy's features: this micro-batch's (local scope) or the global batch's
    metrics: dict[str, float]


class SLMModule(L.LightningModule):
    def __init__(
        self,
        model: GPTConfig,
        optim_cfg: Any,
        selection: Selection,
        *,
        target: Target | None = None,
        scope: str = "global",
        max_steps: int,
        accumulate_grad_batches: int = 1,
        chunk_size: int = 1024,
        keep_probs: bool = True,
        compile: bool = False,
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
        self.scope = scope
        self.planner = Planner(selection, scope, accumulate_grad_batches, chunk_size)
        self.max_steps = max_steps
        self.accumulate = accumulate_grad_batches
        self.chunk_size = chunk_size
        self.keep_probs = keep_probs
        # The head's blocks (the kept softmax, the chunk logits) are reused from step to step.
        self.workspace = Workspace()
        self.compile = compile
        self.tokenizer_json = tokenizer_json
        self.run_config = run_config or {}
        self.counters: dict[str, float] = dict.fromkeys(COUNTERS, 0)
        self.flops_per_batch = 0.0  # read by lightning's ThroughputMonitor (realised FLOPs)
        self.train_seconds = 0.0  # time in training steps during this process (not restored)
        self.tokens_this_run = 0
        self.val_loss: float | None = None
        self.val_step: int | None = None  # global step of the latest validation
        self._val_sums: list[Tensor] = []
        self.val_sources: list[str] = []  # a mixture's sources (the datamodule's), for val/<source>/loss
        self.val_source_losses: dict[str, float] = {}
        self._configured = False

    def configure_model(self) -> None:
        """Parallelism and compilation, applied once the devices exist (Lightning calls this in
        every fit/validate; the model must be wrapped only once)."""
        if self._configured:
            return
        self._configured = True
        if self.device_mesh is not None:  # trainer=fsdp (ModelParallelStrategy)
            bf16 = str(self.trainer.precision).startswith("bf16")
            distributed.shard(self.model, self.device_mesh, mixed_precision=torch.bfloat16 if bf16 else None)
        if self.compile:
            distributed.compile_blocks(self.model)

    # ---- training -------------------------------------------------------------------------
    def _head(self, labels: Tensor, batch: dict[str, Tensor], planned: StepSelection | None, index: int):
        """The loss as a head callable: GPT.forward hands it the final hidden states and the tied
        LM-head weight, so no B×T×V logits tensor is built outside the chunked loss.

        The selection comes from ``planned`` (made over the global batch before this pass), or is
        made here: over every device's copy of this micro-batch (scope=global, one micro-batch per
        step), or over this micro-batch alone (scope=local).
        """

        def head(hidden: Tensor, weight: Tensor) -> tuple[Tensor, MicroOutput]:
            h = hidden.reshape(-1, hidden.shape[-1])
            y = labels.reshape(-1)
            stats = token_stats(h.detach(), weight.detach(), y, chunk_size=self.chunk_size,
                                entropy=self.selection.needs_entropy, keep_probs=self.keep_probs,
                                workspace=self.workspace)
            loss_all = stats.loss  # read before weighted_loss, which takes over the kept softmax
            plan, part = planned, index
            if plan is None:  # select now, on this micro-batch's features
                features = self.selection.features(stats, batch)
                plan = self.planner.select(features, self._devices())
                part = 0
            mask = plan.masks[part]
            scale = plan.scale
            weights = mask.to(torch.float32) * scale
            loss = weighted_loss(h, weight, y, weights, stats, targets=self.target.targets(batch),
                                 chunk_size=self.chunk_size, workspace=self.workspace)
            # A tuple, not a dataclass, so that FSDP2 finds the loss tensor in the output and hooks
            # its backward (it looks through tuples, not through arbitrary objects).
            return loss, MicroOutput(token_loss=loss_all, selected=mask.sum(), features=plan.features,
                                     metrics=plan.metrics)

        return head

    def _devices(self) -> Devices:
        return Devices(self.trainer.global_rank, self.trainer.world_size, self.all_gather)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        t0 = time.perf_counter()
        opt = self.optimizers()
        sched = self.lr_schedulers()
        micro = [dict(zip(batch, parts, strict=True))
                 for parts in zip(*(v.chunk(self.accumulate) for v in batch.values()), strict=True)]
        rescored = self.planner.needs_scoring_pass(len(micro))
        planned = self.planner.plan(self.model, micro, self._devices()) if self.planner.plans_ahead(len(micro)) else None
        loss_sum = torch.zeros((), device=self.device)
        loss_all_sum = torch.zeros((), device=self.device)
        n_tokens = torch.zeros((), device=self.device)
        n_selected = torch.zeros((), device=self.device)
        local_features: list[dict[str, Tensor]] = []
        out: MicroOutput | None = None
        for k, mb in enumerate(micro):
            with distributed.gradient_sync(self.trainer, self.model, enabled=k == len(micro) - 1):
                loss, out = self.model(mb["input_ids"], head=self._head(mb["labels"], mb, planned, k))
                self.manual_backward(loss)
            loss_sum += loss.detach()
            loss_all_sum += out.token_loss.sum()
            n_tokens += out.token_loss.numel()
            n_selected += out.selected
            local_features.append(out.features)
        assert out is not None
        sel_metrics = dict(out.metrics)
        # Adaptive state (Ada-ESLM's α) follows the whole global batch, the same on every device.
        if self.scope == "global":
            step_features = out.features  # the global batch's, gathered for the selection
        else:
            step_features = self.planner.gather({k: torch.cat([f[k] for f in local_features]) for k in local_features[0]},
                                                self._devices())
        sel_metrics.update(self.selection.update(step_features))
        grad_norm = optim.clip(list(self.model.parameters()), self.optim_cfg.grad_clip)
        # One host sync per step: stop before the update, so checkpoints stay finite.
        if not torch.isfinite(loss_sum + grad_norm):
            what = (f"training loss became {loss_sum.item()}" if not torch.isfinite(loss_sum)
                    else f"gradient norm became {grad_norm.item()}")
            raise SlmError(self._diverged(what))
        opt.step()
        opt.zero_grad(set_to_none=True)
        lr = sched.get_last_lr()[0]
        sched.step()

        # Global counts (summed over data-parallel ranks) so counters and FLOPs describe the run.
        counts = self.trainer.strategy.reduce(torch.stack([n_tokens, n_selected, loss_all_sum, loss_sum]),
                                              reduce_op="sum")
        tokens, selected = int(counts[0]), int(counts[1])
        step = flops.step_flops(self.model_config, tokens, selected, keep_probs=self.keep_probs,
                                extra_forward=self.selection.extra_forward_flops(tokens)
                                + self.target.extra_forward_flops(tokens), scoring_pass=rescored)
        self.flops_per_batch = step.realized / self.trainer.world_size
        self.counters["train_tokens"] += tokens
        self.counters["selected_tokens"] += selected
        self.counters["flops_nominal"] += step.nominal
        self.counters["flops_realized"] += step.realized
        self.counters["flops_clm"] += step.clm

        # Each device's loss_sum is its share of the step's loss (global scope: Σ over its selected
        # tokens × world/|S|; local: its micro-batch means / accumulate): the mean over devices is
        # the step's loss.
        train_loss = counts[3] / self.trainer.world_size
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
        self.val_sources = list(getattr(getattr(self.trainer, "datamodule", None), "source_names", None) or [])

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        def head(hidden: Tensor, weight: Tensor) -> Tensor:
            h = hidden.reshape(-1, hidden.shape[-1])
            stats = token_stats(h, weight, batch["labels"].reshape(-1), chunk_size=self.chunk_size,
                                keep_probs=False, workspace=self.workspace)
            # Padding windows (ShardSampler, so every device runs as many batches) weigh 0.
            w = batch["weight"].double()
            loss = (stats.loss.double().view(w.shape[0], -1) * w[:, None]).sum(1)
            # (loss sum, token count) per source of a mixture (a single column for one corpus).
            source = batch.get("source", torch.zeros_like(w, dtype=torch.long))
            sums = torch.zeros(2, max(len(self.val_sources), 1), dtype=torch.float64, device=w.device)
            sums[0].index_add_(0, source, loss)
            sums[1].index_add_(0, source, w * batch["labels"].shape[1])
            return sums

        self._val_sums.append(self.model(batch["input_ids"], head=head))

    def on_validation_epoch_end(self) -> None:
        if not self._val_sums:
            return
        total = self.trainer.strategy.reduce(torch.stack(self._val_sums).sum(0), reduce_op="sum")
        val_loss = float(total[0].sum() / total[1].sum())
        if self.trainer.sanity_checking:
            return
        self.val_loss, self.val_step = val_loss, self.global_step
        self.log_dict({"val/loss": val_loss, "val/ppl": perplexity(val_loss)}, prog_bar=True)
        self.val_source_losses = {name: float(total[0, i] / total[1, i]) for i, name in enumerate(self.val_sources)}
        if self.val_source_losses:
            self.log_dict({f"val/{name}/loss": loss for name, loss in self.val_source_losses.items()})

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
        saved = state["selection"]
        if saved["name"] == self.selection.name:
            self.selection.load_state_dict(saved["state"])
        else:
            # A new strategy on resume (a curriculum: CLM warm-up, then selection) is legitimate:
            # the new one starts its state from its config, and the old one's state is dropped.
            kept = self.selection.state_dict()
            log.info(f"resuming a selection={saved['name']} checkpoint with selection={self.selection.name}: "
                     f"its state {saved['state'] or '{}'} is not used; {self.selection.name} starts from its "
                     f"config {kept or '{}'}")
        torch.set_rng_state(state["torch_rng"])
        self.val_loss = state.get("val_loss")
