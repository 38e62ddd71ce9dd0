"""Parallelism, kept apart from the model (torchtitan's split): FSDP2 sharding, compilation,
gradient-sync control and sharded checkpoints. The model file knows nothing of any of it.

- ``trainer=fsdp`` uses Lightning's ModelParallelStrategy, which builds the device mesh and calls
  ``LightningModule.configure_model``; there :func:`shard` applies ``fully_shard`` to every
  transformer block and then to the whole GPT (the embeddings, the final LayerNorm and the tied
  LM head, which must stay in one unit since the embedding and the head are one tensor).
- ``trainer=ddp`` uses Lightning's DDPStrategy unchanged.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from slm_cli.model.gpt import GPT


def shard(model: GPT, mesh: Any, *, mixed_precision: torch.dtype | None = None) -> None:
    """FSDP2 (per-parameter sharding, ``torch.distributed.fsdp.fully_shard``) over the mesh's
    data-parallel dimension: one unit per block, so at most one block's full weights are gathered
    at a time, then the root. ``mixed_precision`` (bf16 on GPUs) sets the all-gathered parameter
    dtype; gradients are reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dp_mesh = mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh
    policy = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mesh=dp_mesh, mp_policy=policy)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)


def compile_blocks(model: GPT) -> None:
    """``torch.compile`` each transformer block in place (``nn.Module.compile``): parameter names,
    and so checkpoints, stay the same as without compilation, and sharded blocks compile alike."""
    for block in model.transformer.h:
        block.compile()


@contextlib.contextmanager
def gradient_sync(trainer: L.Trainer, model: nn.Module, enabled: bool) -> Iterator[None]:
    """Reduce gradients across devices in this backward only if ``enabled``: with several
    micro-batches per step, only the last backward needs to communicate (the others accumulate
    locally), under DDP (no_sync) as under FSDP2 (set_requires_gradient_sync)."""
    if enabled:
        yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    block = getattr(trainer.strategy, "block_backward_sync", contextlib.nullcontext)  # DDP's no_sync
    with block():
        yield


class FSDPStrategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy (FSDP2) over all devices, with atomic sharded checkpoints.

    A sharded checkpoint is a folder (one shard file per rank, the metadata, and Lightning's
    ``meta.pt`` with everything that is not a tensor shard). It is written under a temporary name
    and renamed into place after every rank has written its shard, so an interrupted save never
    leaves a folder that looks like a valid checkpoint.
    """

    def setup_environment(self) -> None:
        # Pure data parallelism unless told otherwise: Lightning's "auto" would make the tensor-
        # parallel dimension span each node's devices, which this GPT does not implement.
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        tmp = path.with_name(f".{path.name}.tmp")
        if self.global_rank == 0 and tmp.exists():
            shutil.rmtree(tmp)
        self.barrier("slm_checkpoint_tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("slm_checkpoint_written")
        if self.global_rank == 0:
            old = path.with_name(f".{path.name}.old")
            if path.exists():
                path.rename(old)  # rename, not delete, first: one of the two is always complete
            tmp.rename(path)
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()
        self.barrier("slm_checkpoint_committed")

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.global_rank == 0:
            path = Path(filepath)
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def check_launcher() -> None:
    """hydra/launcher=slurm without -m would train here, in this process, and submit nothing."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from slm_cli.errors import SlmError

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.RUN and "submitit" in str(hydra_cfg.launcher.get("_target_", "")):
        raise SlmError("hydra/launcher=slurm submits the jobs of a sweep, and this is a single run: add -m "
                       "(slm train -m hydra/launcher=slurm ...), also for one job")


# What Lightning's local launcher (one process per device, started by rank 0) puts in rank 0's
# own environment; a later job in the same process would read it as "launched by someone else".
LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextlib.contextmanager
def local_launch(command: str) -> Iterator[None]:
    """Run one `slm` job so that Lightning can start its other ranks, also inside a Hydra multirun.

    Lightning starts ranks 1.. of a local run by re-running the program with ``sys.argv`` and
    ``hydra.run.dir=<HydraConfig run.dir>``. Inside `slm`, and above all inside a multirun sweep,
    that command would be wrong three ways (the known Hydra multirun + DDP problem): ``sys.argv``
    has lost the subcommand, it holds the whole sweep (``-m a=1,2,3``, so every rank would start
    the sweep again), and ``run.dir`` is not the sweep job's dir. Here, for the job's duration,
    ``sys.argv`` is the program, the subcommand and this job's own overrides, and ``run.dir`` is
    the job's output dir. Afterwards the launcher's environment variables are restored and the
    process group is closed, so that the sweep's next job launches its ranks afresh instead of
    waiting forever for ranks that have exited. Processes started by torchrun or srun (LOCAL_RANK
    already set) are left as they are.
    """
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    from slm_cli.commands import PROGRAM

    ours = "LOCAL_RANK" not in os.environ
    saved_env = {k: os.environ.get(k) for k in LAUNCH_ENV}
    saved_argv = sys.argv[:]
    if ours and PROGRAM and HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        sys.argv = [PROGRAM, command, *hydra_cfg.overrides.task]
        with read_write(hydra_cfg), open_dict(hydra_cfg):
            hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = saved_argv
        if ours:
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
