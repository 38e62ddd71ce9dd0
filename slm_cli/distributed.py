"""Parallelism, kept apart from the model (torchtitan's split): FSDP2 sharding, compilation,
gradient-sync control and the FSDP strategy with its sharded checkpoints. The model file knows
nothing of any of it, and launching processes is elsewhere (slm_cli/commands/launch.py).

- ``trainer=fsdp`` uses Lightning's ModelParallelStrategy, which builds the device mesh and calls
  ``LightningModule.configure_model``; there :func:`shard` applies ``fully_shard`` to every
  transformer block and then to the whole GPT (the embeddings, the final LayerNorm and the tied
  LM head, which must stay in one unit since the embedding and the head are one tensor).
- ``trainer=ddp`` uses Lightning's DDPStrategy unchanged.
"""

from __future__ import annotations

import contextlib
import shutil
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
