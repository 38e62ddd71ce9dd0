"""Building the lightning.Trainer: callbacks, loggers, plugins and the run's metrics file.

Lightning owns the loop; what slm adds is here: periodic and last checkpoints with atomic IO, the
throughput monitor fed with realised FLOPs, SLURM requeue owned by the submitter, and metrics.csv
kept across a resumed run.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig

from slm_cli.outputs import AtomicCheckpointIO, read_metrics, write_metrics

# Deliberate choices that Lightning warns about: memmap windows need no loader workers, and the
# loader is infinite (the run ends at trainer.max_steps).
for _pattern in (".*does not have many workers.*", ".*The number of training batches.*",
                 ".*`training_step` returns `None`.*", ".*on_validation_epoch_end.*sync_dist.*",
                 # val/loss is reduced over devices by the module itself (sums, then one division)
                 ".*when logging on epoch level in distributed.*",
                 ".*ThroughputMonitor.*", ".*Checkpoint directory .* exists and is not empty.*",
                 # the run dir already holds Hydra's .hydra/ and log when the CSV logger starts
                 ".*Experiment logs directory .* exists and is not empty.*", ".*LeafSpec.*",
                 # checkpoints are taken after the optimizer step on purpose: step<N>.ckpt holds
                 # the state after N updates, which is what resume expects
                 ".*ModelCheckpoint with manual optimization.*"):
    warnings.filterwarnings("ignore", _pattern)



class LoggingStepFix(Callback):
    """Saved after fit (train.py's final last.ckpt), Lightning's logging-step counter has already
    moved past the last step, and its restore adds one more (it expects saves from inside the
    step): without this, metrics of a continued run skip a step."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.training:
            return
        epoch_loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
        if epoch_loop.get("_batches_that_stepped"):
            epoch_loop["_batches_that_stepped"] -= 1


def build_trainer(cfg: DictConfig, run_dir: Path, *, resume_step: int = 0) -> L.Trainer:
    """lightning.Trainer from conf/trainer/ and conf/logger/, with slm's checkpointing."""
    # Hydra's job logging already prints and files every record; Lightning's own console handler
    # would print each of its messages a second time.
    for name in ("lightning", "lightning.pytorch"):
        lightning_log = logging.getLogger(name)
        for handler in list(lightning_log.handlers):
            lightning_log.removeHandler(handler)
        lightning_log.propagate = True
    # Lightning advertises a cloud logger at every start; not useful in a run's log.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage())
    t = cfg.trainer
    loggers = [instantiate(c) for c in cfg.logger.values()] if cfg.logger else False
    checkpoints = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step{step:07d}",
                                  auto_insert_metric_name=False, every_n_train_steps=t.checkpoint_every_n_steps,
                                  save_last=True, save_top_k=-1)
    throughput = ThroughputMonitor(batch_size_fn=lambda b: b["input_ids"].shape[0],
                                   length_fn=lambda b: b["input_ids"].numel())
    plugins: list[Any] = [AtomicCheckpointIO()]
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        # Requeue has one owner: the submitter (submitit for hydra/launcher=slurm, the batch
        # script for scripts/submit_slurm.sh), never Lightning as well; a requeued job resumes
        # from its run dir's last.ckpt (resume_path).
        plugins.append(SLURMEnvironment(auto_requeue=False))
    strategy = instantiate(t.strategy) if isinstance(t.strategy, DictConfig) else t.strategy
    trainer = L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy,
        precision=t.precision, max_steps=t.max_steps, val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None, num_sanity_val_steps=0, log_every_n_steps=t.log_every_n_steps,
        logger=loggers, callbacks=[checkpoints, throughput, LoggingStepFix()], enable_progress_bar=t.enable_progress_bar,
        deterministic=t.deterministic, use_distributed_sampler=False, plugins=plugins,
        default_root_dir=run_dir, enable_model_summary=False,
    )
    if resume_step and trainer.is_global_zero:
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                continue_metrics(logger, resume_step)
    return trainer


def continue_metrics(logger: CSVLogger, step: int) -> None:
    """A resumed run's metrics.csv keeps the rows logged before `step` (the later steps are
    trained, and logged, again). Lightning's CSV writer deletes an existing metrics.csv when it
    starts, so the rows are read first, written back after, and the writer is told the header so
    that it appends to the file."""
    path = Path(logger.log_dir) / "metrics.csv"
    header, rows = read_metrics(path, before_step=step)
    writer = logger.experiment  # created here: this is where Lightning deletes the file
    if header:
        write_metrics(path, header, rows)
        writer.metrics_keys = header
