"""The LightningModule: wires model, loss, selection and accounting; owns no formula.

One optimizer step per batch: the batch holds `accumulate_grad_batches` micro-batches of
`data.batch_size` windows, and training_step runs them itself (manual optimization), in three
parts as torchtitan's train loop: :meth:`forward_backward` (one micro-batch: instance selection,
forward, token selection, backward), :meth:`optimizer_step` (clip, divergence check, step) and
:meth:`account` (counters, FLOPs and logs, slm_cli/accounting.py).

Where the strategy selects (trainer.selection_scope: each micro-batch, or the global batch) is
slm_cli/selection/scope.py's; this module only hands it each micro-batch's features.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from slm_cli import distributed, optim
from slm_cli.accounting import Counters, MicroResult, step_cost, step_counts, step_metrics
from slm_cli.errors import SlmError
from slm_cli.loss import Workspace, model_token_stats, perplexity, token_stats, weighted_loss
from slm_cli.model.gpt import GPT, GPTConfig
from slm_cli.selection import instances
from slm_cli.selection.base import Selection
from slm_cli.selection.clm import CLM
from slm_cli.selection.scope import Devices, MicroBatch, Scope, build_scope
from slm_cli.target.base import Target
from slm_cli.target.onehot import OneHot

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


@dataclass
class Phase:
    """What selects during a step: the strategy, its scope, and the positions its early exit reads
    (None without instance selection)."""

    selection: Selection
    scope: Scope
    positions: Tensor | None

    @classmethod
    def of(cls, selection: Selection, scope: str, accumulate: int, model: GPTConfig) -> Phase:
        return cls(selection, build_scope(scope, selection, accumulate),
                   instances.exit_positions(selection, model.block_size))


class SLMModule(L.LightningModule):
    def __init__(
        self,
        model: GPTConfig,
        optim_cfg: Any,
        selection: Selection,
        *,
        target: Target | None = None,
        scope: str = "micro_batch",
        selection_start_step: int = 0,
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
        selection.configure(model)
        self.target = target or OneHot()
        # A warm start trains every token (CLM) before trainer.selection_start_step, the strategy after.
        self.selection_start_step = selection_start_step
        self.phases = {"warm_up": Phase.of(CLM(), MicroBatch.name, accumulate_grad_batches, model),
                       "selection": Phase.of(selection, scope, accumulate_grad_batches, model)}
        self.phase = self.phases["selection"]
        self.max_steps = max_steps
        self.accumulate = accumulate_grad_batches
        self.chunk_size = chunk_size
        self.keep_probs = keep_probs
        # The head's blocks (the kept softmax, the chunk logits) are reused from step to step.
        self.workspace = Workspace()
        self.compile = compile
        self.tokenizer_json = tokenizer_json
        self.run_config = run_config or {}
        self.counters = Counters()
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

    # ---- training: one step = micro-batches' forward and backward, the optimizer step, accounting --
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        t0 = time.perf_counter()
        devices = self._devices()
        self.phase = self.phases["warm_up" if self.global_step < self.selection_start_step else "selection"]
        micro = [dict(zip(batch, parts, strict=True))
                 for parts in zip(*(v.chunk(self.accumulate) for v in batch.values()), strict=True)]
        self.phase.scope.start_step(self.model, micro, devices, self.chunk_size)
        results = []
        for k, mb in enumerate(micro):
            with distributed.gradient_sync(self.trainer, self.model, enabled=k == len(micro) - 1):
                results.append(self.forward_backward(mb, k, devices))
        # Adaptive state (Ada-ESLM's α) follows the whole global batch, the same on every device.
        adapted = self.phase.selection.update(self.phase.scope.step_features([r.features for r in results], devices))
        grad_norm, lr = self.optimizer_step(torch.stack([r.loss for r in results]).sum())
        self.account(results, grad_norm, lr, adapted)
        self.train_seconds += time.perf_counter() - t0

    def forward_backward(self, batch: dict[str, Tensor], index: int, devices: Devices) -> MicroResult:
        """One micro-batch: the windows kept by instance selection (all without it) run forward;
        the head selects tokens and builds the weighted loss; then the backward."""
        drawn = batch["labels"].numel()
        window_metrics: dict[str, float] = {}
        selection, positions = self.phase.selection, self.phase.positions
        if positions is not None:
            features = instances.window_features(self.model, batch, selection, positions, chunk_size=self.chunk_size,
                                                 workspace=self.workspace)
            kept = selection.select_windows(features)
            batch, window_metrics = instances.keep_windows(batch, kept), kept.metrics
        head = functools.partial(self.selective_loss, batch=batch, index=index, devices=devices)
        loss, result = self.model(batch["input_ids"], head=head)
        self.manual_backward(loss)
        result.drawn = drawn
        result.metrics.update(window_metrics)
        return result

    def selective_loss(self, hidden: Tensor, weight: Tensor, *, batch: dict[str, Tensor], index: int,
                       devices: Devices) -> tuple[Tensor, MicroResult]:
        """The LM head of one micro-batch (GPT.forward hands it the final hidden states and the tied
        weight, so no B×T×V logits exist outside the chunked loss): per-token statistics, the
        scope's selection, and the loss weighted on the selected tokens."""
        h = hidden.reshape(-1, hidden.shape[-1])
        y = batch["labels"].reshape(-1)
        selection, scope = self.phase.selection, self.phase.scope
        stats = token_stats(h.detach(), weight.detach(), y, chunk_size=self.chunk_size,
                            entropy=selection.needs_entropy, keep_probs=self.keep_probs, workspace=self.workspace)
        token_loss = stats.loss  # read before weighted_loss, which takes over the kept softmax
        features = selection.features(stats, batch)
        choice = scope.choose(index, features, devices)
        weights = choice.mask.to(torch.float32) * choice.scale
        loss = weighted_loss(h, weight, y, weights, stats, targets=self.target.targets(batch),
                             chunk_size=self.chunk_size, workspace=self.workspace)
        # A tuple, not a dataclass, so that FSDP2 finds the loss tensor in the output and hooks
        # its backward (it looks through tuples, not through arbitrary objects).
        return loss, MicroResult(loss=loss.detach(), token_loss=token_loss, drawn=y.numel(),
                                 selected=choice.mask.sum(), features=features, metrics=dict(choice.metrics))

    def optimizer_step(self, loss: Tensor) -> tuple[Tensor, float]:
        """Clip, stop before an update that is not finite (one host sync per step, so checkpoints
        stay finite), step the optimizer and the schedule. Returns the gradient norm and the lr used."""
        opt, sched = self.optimizers(), self.lr_schedulers()
        grad_norm = optim.clip(list(self.model.parameters()), self.optim_cfg.grad_clip)
        if not torch.isfinite(loss + grad_norm):
            what = (f"training loss became {loss.item()}" if not torch.isfinite(loss)
                    else f"gradient norm became {grad_norm.item()}")
            raise SlmError(self._diverged(what))
        opt.step()
        opt.zero_grad(set_to_none=True)
        lr = sched.get_last_lr()[0]
        sched.step()
        return grad_norm, lr

    def account(self, results: list[MicroResult], grad_norm: Tensor, lr: float, adapted: dict[str, float]) -> None:
        """Counters and FLOPs from the step's counts summed over devices (so they describe the run,
        not one device), and the step's logs."""
        world = self.trainer.world_size
        counts = step_counts(results, lambda t: self.trainer.strategy.reduce(t, reduce_op="sum"), world)
        step = step_cost(self.model_config, self.phase.selection, self.target, self.phase.scope,
                         keep_probs=self.keep_probs, tokens=counts.tokens, forward_tokens=counts.forward_tokens,
                         selected=counts.selected)
        self.flops_per_batch = step.realized / world
        self.counters.add(counts, step)
        metrics = step_metrics(counts, self.counters, grad_norm, lr, adapted, windows=self.phase.positions is not None)
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=counts.tokens)
        self.log("train/loss", counts.loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=counts.tokens)
        self.tokens_this_run += counts.tokens

    def _devices(self) -> Devices:
        return Devices(self.trainer.global_rank, self.trainer.world_size, self.all_gather)

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
        stats = model_token_stats(self.model, batch["input_ids"], batch["labels"], chunk_size=self.chunk_size,
                                  workspace=self.workspace)
        # Padding windows (ShardSampler, so every device runs as many batches) weigh 0.
        w = batch["weight"].double()
        loss = (stats.loss.double().view(w.shape[0], -1) * w[:, None]).sum(1)
        # (loss sum, token count) per source of a mixture (a single column for one corpus).
        source = batch.get("source", torch.zeros_like(w, dtype=torch.long))
        sums = torch.zeros(2, max(len(self.val_sources), 1), dtype=torch.float64, device=w.device)
        sums[0].index_add_(0, source, loss)
        sums[1].index_add_(0, source, w * batch["labels"].shape[1])
        self._val_sums.append(sums)

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
            "counters": self.counters.state_dict(),
            "selection": {"name": self.selection.name, "state": self.selection.state_dict()},
            "torch_rng": torch.get_rng_state(),
            "val_loss": self.val_loss,
            "config": self.run_config,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["slm"]
        self.counters.load_state_dict(state["counters"])
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
