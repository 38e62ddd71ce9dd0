"""Preemption: save the step reached, then exit so that the requeued job resumes from it.

SLURM ends a job with SIGTERM (then SIGKILL after the cluster's KillWait): at its time limit, on
`scontrol requeue`, on preemption, on `scancel`. Before a time limit it first sends a warning
signal: USR2 to every task under hydra/launcher=slurm (submitit's `--signal=USR2@signal_delay_s`),
USR1 to the batch shell of scripts/submit_slurm.sh, which passes it on to the tasks. On any of
these three signals, `Preemption` saves `checkpoints/last.ckpt` at the end of the step in progress
and stops training there, so nothing is lost: the requeued job resumes from that very step
(docs/scaling.md), not from the last periodic checkpoint, which may be many steps behind.

Requeueing stays with its one owner (docs/scaling.md): this module never requeues. After the save
it hands the signal to the handler the process had before training (submitit's, under the
launcher, which requeues from rank 0 and exits) and exits with 128 + the signal's number: not 0,
so that neither submitit nor the batch script takes the run for finished.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)

# SIGTERM: the end (any SLURM kill, `kill`, a container stop); USR1 and USR2: the warnings before
# a time limit of scripts/submit_slurm.sh and of submitit (their default action would kill the run).
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Preemption(Callback):
    """On SIGTERM, USR1 or USR2: save last.ckpt at the next step boundary, stop, and exit.

    - The signal handler only records the signal; the work happens in `on_train_batch_end`, where
      the state is a complete step (the same place as Lightning's periodic checkpoints, so resume
      treats it like one).
    - All ranks agree at every step boundary (an all-reduce max of the signal number): a signal
      that reached one rank a moment after the others, or only one rank, still makes every rank
      save the same step, which a sharded checkpoint needs and DDP's collectives require.
    - The step then finishes as usual (its metrics row, a validation that falls on it), and the
      process exits in `on_train_end`, before ModelCheckpoint's own last.ckpt at the end of
      training; `slm train` never reaches its final validation and summary.json.

    Lightning's own SIGTERM handling (stop after the step, without a checkpoint) is replaced while
    training runs, and restored after, as are the other two signals' handlers.
    """

    def __init__(self, last_ckpt: Path) -> None:
        self.last_ckpt = Path(last_ckpt)
        self.received = 0  # the signal's number, set by the handler
        self.stopped_by = 0  # the signal every rank agreed on at the boundary where training stopped
        # Before Lightning installs its handlers: whoever owns these signals in this process
        # (submitit's requeue handler under the launcher, or the default action).
        self._owners = {s: signal.getsignal(s) for s in SIGNALS}
        self._replaced: dict[int, Any] = {}

    def _record(self, signum: int, frame: Any) -> None:
        self.received = signum  # only a flag: the save happens at the step boundary

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():  # Python delivers signals there only
            return
        for s in SIGNALS:
            self._replaced[s] = signal.signal(s, self._record)

    def _restore(self) -> None:
        for s, handler in self._replaced.items():
            signal.signal(s, handler)
        self._replaced = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # One tiny collective per step (a no-op on one device), so that the decision is collective too.
        flag = torch.tensor(self.received, device=pl_module.device)
        agreed = int(trainer.strategy.reduce(flag, reduce_op="max"))
        if not agreed or self.stopped_by:
            return
        self.stopped_by = agreed
        trainer.save_checkpoint(self.last_ckpt, weights_only=False)  # every rank takes part (sharded checkpoints)
        if trainer.is_global_zero:
            log.warning(f"received {signal.Signals(agreed).name}: saved {self.last_ckpt} at step {trainer.global_step}; "
                        f"stopping so that the job can be requeued and resume from there")
        # Stop the loop after this step as if max_steps were reached, not with trainer.should_stop:
        # Lightning validates when should_stop is set (for early stopping), which would add a
        # validation that an uninterrupted run does not have, and spend the time SLURM leaves
        # before SIGKILL.
        trainer.fit_loop.epoch_loop.max_steps = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()
        if self.stopped_by:
            self.exit()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def exit(self) -> NoReturn:
        """Hand the signal to its owner from before training, then exit with 128 + its number.

        Under hydra/launcher=slurm the owner of USR2 is submitit: on rank 0 it requeues the job and
        exits itself (on the other ranks it does nothing), as it would have done on the signal.
        Its SIGTERM handler only logs. Elsewhere the owner is the default action, and the exit
        status says which signal ended the run (143 for SIGTERM), as if it had killed it.
        """
        owner = self._owners.get(self.stopped_by)
        if callable(owner):
            owner(self.stopped_by, None)
        raise SystemExit(128 + self.stopped_by)
