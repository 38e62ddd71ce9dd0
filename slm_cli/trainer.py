"""Building the lightning.Trainer: callbacks, loggers, plugins and the run's metrics file.

Lightning owns the loop; what slm adds is here: periodic and last checkpoints with atomic IO, the
throughput monitor fed with realised FLOPs, SLURM requeue owned by the submitter, a checkpoint on
preemption (slm_cli/preemption.py), progress in optimizer steps (a bar on a terminal, plain lines in
a log: slm_cli/progress.py), and logs that a resumed run continues: each row labelled with its
optimizer step, metrics.csv and TensorBoard keeping what was logged before the resumed step.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar, ThroughputMonitor
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from slm_cli.errors import SlmError
from slm_cli.outputs import AtomicCheckpointIO, read_metrics, write_metrics
from slm_cli.preemption import Preemption
from slm_cli.progress import Progress

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
    progress counters where in the loop the checkpoint was written. The guess holds for a save
    inside a step (ModelCheckpoint, Preemption) but not for run.py's final last.ckpt, written after
    fit: there it depends on whether a `trainer.validate` ran between fit and the save, so a run
    continued from it would repeat a label or skip one. And `trainer.validate` after fit would
    label its row one past the last step, where an in-loop validation shares its step's label.

    slm runs exactly one optimizer step per batch (manual optimization, no Lightning accumulation),
    so the right label is known whatever the checkpoint says: `global_step` when a step starts,
    `global_step - 1` once it is done. Setting the counter to that at the start of every step and
    of every validation makes the labels independent of where the checkpoint was written.
    """

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.fit_loop.epoch_loop._batches_that_stepped = max(trainer.global_step - 1, 0)


class TrainThroughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor, logging training throughput only. Its validation rows
    (`validate/*`) are labelled with a count of validation batches, not an optimizer step: in
    metrics.csv they would fall among the training steps, where no resume can keep or drop them by
    step. Validation batches are still timed, so that validation time stays out of training throughput."""

    @rank_zero_only
    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                *args: Any, **kwargs: Any) -> None:
        if not trainer.sanity_checking:
            self._update(trainer, pl_module, batch, trainer._evaluation_loop.batch_progress.total.ready)


class StepProgress(ProgressBar):
    """Training in optimizer steps of `trainer.max_steps` and validation in batches, through
    slm_cli/progress.py: a bar on a terminal, plain lines in a log. A step-budgeted run has no
    epochs, so Lightning's own bars (`Epoch 0/-2`) say nothing about how far it is.

    The fields are what the module logs with `prog_bar=True` (train/loss, val/loss, val/ppl);
    the rate is in tokens (every device's), the same count as summary.json's train_tokens."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._train: Progress | None = None
        self._val: Progress | None = None

    def disable(self) -> None:  # Lightning calls it on ranks other than 0
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @staticmethod
    def _tokens(trainer: L.Trainer, batch: Any) -> int:
        return int(batch["input_ids"].numel()) * trainer.world_size

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train = Progress(trainer.max_steps, "train", "step", initial=trainer.global_step,
                               disable=not self._enabled)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._train is not None:
            self._train.update(1, tokens=self._tokens(trainer, batch), **trainer.progress_bar_metrics)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._train is not None:
            self._train.close()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            # At step N of a run (the last step trained), so that a log says which weights it measures.
            self._val = Progress(self.total_val_batches, f"val at step {max(trainer.global_step, 0)}", "batch",
                                 leave=False, disable=not self._enabled)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._val is not None:
            self._val.update(1, tokens=self._tokens(trainer, batch))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._val is None:
            return
        metrics = trainer.progress_bar_metrics
        self._val.set(**{k: v for k, v in metrics.items() if k.startswith("val/")})
        self._val.close()
        self._val = None
        if self._train is not None:
            self._train.set(**metrics)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        for progress in (self._val, self._train):
            if progress is not None:
                progress.close()


# conf/trainer keys that slm reads itself; every other key is a lightning.Trainer argument.
SLM_KEYS = frozenset({"max_tokens", "accumulate_grad_batches", "checkpoint_every_n_steps", "compile",
                      "limit_val_batches", "export_at_end", "check_memory", "selection_scope",
                      "selection_start_step"})
# Lightning arguments that build_trainer sets itself: from conf/trainer (PASSED) or fixed (OWNED).
PASSED = frozenset({"accelerator", "devices", "num_nodes", "strategy", "precision", "max_steps", "val_check_interval",
                    "log_every_n_steps", "enable_progress_bar", "deterministic"})
OWNED = {
    "logger": "use logger=csv|wandb|tensorboard", "callbacks": "slm sets checkpointing, throughput and progress itself",
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


def build_trainer(cfg: DictConfig, run_dir: Path, *, resume_step: int = 0,
                  callbacks: Sequence[Callback] = ()) -> L.Trainer:
    """lightning.Trainer from conf/trainer/ and conf/logger/, with slm's checkpointing.

    `callbacks` (e.g. a benchmark's clock) come first in the callback list, so that their hooks
    run before slm's own at every step; Lightning still moves checkpointing to the end."""
    quiet_lightning_logs()
    t = cfg.trainer
    checkpoints = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step{step:07d}",
                                  auto_insert_metric_name=False, every_n_train_steps=t.checkpoint_every_n_steps,
                                  save_last=True, save_top_k=-1)
    throughput = TrainThroughput(batch_size_fn=lambda b: b["input_ids"].shape[0],
                                 length_fn=lambda b: b["input_ids"].numel())
    # The progress display ends before Preemption, whose on_train_end may exit the process.
    progress = [StepProgress()] if t.enable_progress_bar else []
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
        logger=build_loggers(cfg, resume_step),
        callbacks=[*callbacks, checkpoints, throughput, OptimizerStepLabels(), *progress,
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


def quiet_lightning_logs() -> None:
    """Lightning's messages once each, without its advertisement."""
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


# Loggers whose library is an optional extra: class name -> (the extra, modules any one of which
# serves; Lightning's TensorBoard logger also writes through tensorboardX).
LOGGER_EXTRAS = {"WandbLogger": ("wandb", ("wandb",)),
                 "TensorBoardLogger": ("tensorboard", ("tensorboard", "tensorboardX"))}


def build_loggers(cfg: DictConfig, resume_step: int) -> list[Any] | bool:
    """conf/logger/'s loggers; one that needs a missing extra stops the run before it starts, in one line."""
    import importlib.util

    if not cfg.logger:
        return False
    for name, logger_cfg in cfg.logger.items():
        extra, modules = LOGGER_EXTRAS.get(str(logger_cfg._target_).rsplit(".", 1)[-1], ("", ()))
        if modules and all(importlib.util.find_spec(m) is None for m in modules):
            raise SlmError(f"logger={name} needs {modules[0]}, which is not installed: pip install 'slm[{extra}]' "
                           "(make install has every extra), or use logger=csv")
    return [instantiate(c, **continued(c, resume_step)) for c in cfg.logger.values()]


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
