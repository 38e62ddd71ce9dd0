"""The LightningDataModule: prepared token streams -> training and validation windows.

The training order is a pure function of (seed, step): the loader for a run that resumes at step s
simply starts at s, so resume needs no dataloader state, and the global batch of a step is the same
for any number of devices (each rank reads its contiguous slice).
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from slm_cli.data.prepared import PreparedData
from slm_cli.data.windows import ShardSampler, StepSampler, TrainWindows, ValWindows


class SLMDataModule(L.LightningDataModule):
    def __init__(
        self,
        prepared: PreparedData,
        *,
        block_size: int,
        batch_size: int,
        seed: int,
        accumulate_grad_batches: int = 1,
        num_workers: int = 0,
        val_batches: int | None = None,
        token_arrays: dict[str, np.ndarray] | None = None,
        window_grid: int | None = None,
    ) -> None:
        super().__init__()
        self.prepared = prepared
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.accumulate = accumulate_grad_batches
        self.num_workers = num_workers
        self.val_batches = val_batches
        self.token_arrays = token_arrays or {}  # per-token arrays gathered into training batches
        self.window_grid = window_grid  # training windows start on multiples of this (TrainWindows)

    @property
    def source_names(self) -> list[str]:
        """A mixture's sources, in the order of the validation batches' ``source`` index ([] for one corpus)."""
        return self.prepared.source_names

    def _loader(self, dataset, **kwargs) -> DataLoader:
        # A private generator: a DataLoader draws a seed from torch's global RNG each time it starts
        # an iterator, which would make the global stream (dropout, random selection) depend on
        # when loaders restart, and so break exact resume.
        return DataLoader(dataset, num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          generator=torch.Generator().manual_seed(self.seed), **kwargs)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        # Lightning restores the checkpoint before it asks for the loader, so global_step is the
        # step this run resumes at.
        start = trainer.global_step if trainer is not None else 0
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        # A mixture (slm_cli/data/mixture.py) draws each window from one source's span by weight.
        windows = TrainWindows(self.prepared.tokens("train"), self.block_size, self.seed, self.token_arrays,
                               grid=self.window_grid, spans=self.prepared.spans("train"),
                               weights=self.prepared.source_weights)
        sampler = StepSampler(self.batch_size * self.accumulate, start_step=start, rank=rank, world_size=world)
        return self._loader(windows, sampler=sampler, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        # val_batches counts batches of the global batch's size (every micro-batch on every
        # device), so the validation windows are the same however the global batch is split.
        global_rows = self.batch_size * self.accumulate * world
        max_windows = None if self.val_batches is None else self.val_batches * global_rows
        # A mixture: up to max_windows from each source's val span, each window tagged with its source.
        windows = ValWindows(self.prepared.tokens("val"), self.block_size, max_windows=max_windows,
                             spans=self.prepared.spans("val"))
        return self._loader(windows, batch_size=self.batch_size, sampler=ShardSampler(len(windows), rank, world))
