"""Building the lightning.Trainer: callbacks, loggers, plugins and the run's metrics file.

Lightning owns the loop; what slm adds is here: periodic and last checkpoints with atomic IO, the
throughput monitor fed with realised FLOPs, SLURM requeue owned by the submitter, a checkpoint on
preemption (slm_cli/preemption.py), and logs that a resumed run continues: each row labelled with
its optimizer step, metrics.csv and TensorBoard keeping what was logged before the resumed step.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from slm_cli.errors import SlmError
from slm_cli.outputs import AtomicCheckpointIO, read_metrics, write_metrics
from slm_cli.preemption import Preemption

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



class OptimizerStepLabels(Callback):
    """Every logged row carries the 0-based index of the optimizer step it belongs to, in a resumed
    run too; validation rows carry the index of the last step trained, like its training row.

    Lightning labels rows with its own counter, `fit_loop.epoch_loop._batches_that_stepped`, not
    with `global_step`. It raises it after each training batch (after that batch's validation and
    logging) and saves it in checkpoints; on restore it adds 1 or not, guessing from the loop's
    progress counters where in the loop the checkpoint was written. For a save inside a step
    (ModelCheckpoint, Preemption) the guess is right. For train.py's final last.ckpt, written after
    fit, it depends on whether a `trainer.validate` ran between fit and the save, so a run continued
    from there repeated one label or skipped one (a correction that subtracted 1 from the saved
    counter fixed one case and broke the other: steps 0-5, then 5, 6, 7 and never 8). And
    `trainer.validate` after fit logged one past the last step, where an in-loop validation shares
    its step's label (and a run continued from there dropped that row as a later step's).

    slm runs exactly one optimizer step per batch (manual optimization, no Lightning accumulation),
    so the right label is known, whatever the checkpoint says: `global_step` when a step starts,
    `global_step - 1` once it is done. Setting the counter to that at the start of every step and
    of every validation makes the labels independent of where the checkpoint was written.
    """

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.fit_loop.epoch_loop._batches_that_stepped = max(trainer.global_step - 1, 0)


class TrainThroughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor, logging training throughput only. Its validation rows
    (`validate/*`) are labelled with a count of validation batches, not an optimizer step, so in
    metrics.csv they fell among the training steps, and no resume could keep or drop them by step.
    Validation batches are still timed, so that validation time stays out of training throughput."""

    @rank_zero_only
    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                *args: Any, **kwargs: Any) -> None:
        if not trainer.sanity_checking:
            self._update(trainer, pl_module, batch, trainer._evaluation_loop.batch_progress.total.ready)


# conf/trainer keys that slm reads itself; every other key is a lightning.Trainer argument.
SLM_KEYS = frozenset({"max_tokens", "accumulate_grad_batches", "checkpoint_every_n_steps", "compile",
                      "limit_val_batches", "export_at_end", "check_memory", "selection_scope",
                      "selection_start_step"})
# Lightning arguments that build_trainer sets itself: from conf/trainer (PASSED) or fixed (OWNED).
PASSED = frozenset({"accelerator", "devices", "num_nodes", "strategy", "precision", "max_steps", "val_check_interval",
                    "log_every_n_steps", "enable_progress_bar", "deterministic"})
OWNED = {
    "logger": "use logger=csv|wandb|tensorboard", "callbacks": "slm sets checkpointing and throughput itself",
    "plugins": "slm sets its checkpoint IO itself", "default_root_dir": "use hydra.run.dir",
    "check_val_every_n_epoch": "use trainer.val_check_interval (in steps)", "num_sanity_val_steps": "not used",
    "use_distributed_sampler": "slm samples by step itself", "enable_model_summary": "not used",
    "max_epochs": "use trainer.max_steps or trainer.max_tokens",
}


def lightning_extras(t: DictConfig) -> dict[str, Any]:
    """The other conf/trainer keys (e.g. `+trainer.profiler=simple`), passed to lightning.Trainer
    after a check against its signature, so that Lightning's features work as Lightning users
    expect instead of being dropped."""
    import inspect

    accepted = inspect.signature(L.Trainer.__init__).parameters
    extras = {}
    for key in t:
        if key in SLM_KEYS or key in PASSED:
            continue
        if key in OWNED:
            raise SlmError(f"trainer.{key} is set by slm itself: {OWNED[key]}")
        if key not in accepted:
            raise SlmError(f"trainer.{key} is neither an slm key nor a lightning.Trainer argument: check the "
                           "spelling against lightning.Trainer's arguments, or remove it")
        extras[key] = t[key]
    return extras


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
    loggers = [instantiate(c, **continued(c, resume_step)) for c in cfg.logger.values()] if cfg.logger else False
    checkpoints = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step{step:07d}",
                                  auto_insert_metric_name=False, every_n_train_steps=t.checkpoint_every_n_steps,
                                  save_last=True, save_top_k=-1)
    throughput = TrainThroughput(batch_size_fn=lambda b: b["input_ids"].shape[0],
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
        logger=loggers, callbacks=[checkpoints, throughput, OptimizerStepLabels(),
                                   Preemption(run_dir / "checkpoints" / "last.ckpt")],
        enable_progress_bar=t.enable_progress_bar,
        deterministic=t.deterministic, use_distributed_sampler=False, plugins=plugins,
        default_root_dir=run_dir, enable_model_summary=False, **lightning_extras(t),
    )
    if resume_step and trainer.is_global_zero:
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                continue_metrics(logger, resume_step)
    return trainer


def continued(logger_cfg: DictConfig, step: int) -> dict[str, Any]:
    """Arguments for a logger of a run resumed at `step`. TensorBoard: `purge_step` makes the
    SummaryWriter start its event file with a restart marker at `step`, and TensorBoard's reader
    then hides the events of earlier files from `step` on (the steps trained, and logged, again),
    as metrics.csv drops them (continue_metrics). W&B gets nothing: it is given the right steps
    (OptimizerStepLabels) as `trainer/global_step`, but a W&B run (continued under its id,
    conf/logger/wandb.yaml) cannot forget what it logged, so steps redone after a resume from a
    periodic checkpoint appear twice there."""
    from hydra.utils import get_class

    if step and issubclass(get_class(logger_cfg._target_), TensorBoardLogger):
        return {"purge_step": step}
    return {}


def continue_metrics(logger: CSVLogger, step: int) -> None:
    """A resumed run's metrics.csv keeps the rows logged before `step`: the later steps are
    trained, and logged, again, and OptimizerStepLabels makes the rows before `step` exactly those
    of the steps the checkpoint holds. Lightning's CSV writer deletes an existing metrics.csv when
    it starts, so the rows are read first, written back after, and the writer is told the header
    so that it appends to the file."""
    path = Path(logger.log_dir) / "metrics.csv"
    header, rows = read_metrics(path, before_step=step)
    writer = logger.experiment  # created here: this is where Lightning deletes the file
    if header:
        write_metrics(path, header, rows)
        writer.metrics_keys = header


def finish_loggers(trainer: L.Trainer) -> None:
    """Close the W&B run of this job: wandb keeps one run open per process, and Lightning's
    WandbLogger attaches a new logger to it, so without this every later job of a multirun would
    log into the first job's run."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()
