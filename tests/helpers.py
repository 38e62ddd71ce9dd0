"""Shared test helpers: run the `slm` CLI in a subprocess and tiny run settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# A model and corpus small enough that a step takes milliseconds on a CPU.
TINY_DATA = [
    "data.name=tiny", "data.max_bytes=300000", "data.vocab_size=512", "data.batch_size=4",
]
TINY_MODEL = ["model.block_size=32", "model.n_layer=2", "model.n_head=2", "model.n_embd=64"]
QUIET = ["trainer.enable_progress_bar=false", "trainer.limit_val_batches=4"]


def slm(*args: str, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m slm_cli ARGS` (the same code path as the `slm` console script)."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None) if not env or "HYDRA_FULL_ERROR" not in env else None
    return subprocess.run([sys.executable, "-m", "slm_cli", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}"
    return proc


def train(run_dir: Path, data_dir: Path, *overrides: str, cwd: Path) -> dict:
    """A tiny training run; returns its summary.json."""
    ok(slm("train", f"hydra.run.dir={run_dir}", f"paths.data_dir={data_dir}", *TINY_DATA, *TINY_MODEL, *QUIET,
           *overrides, cwd=cwd))
    return json.loads((run_dir / "summary.json").read_text())


def float64_token_stats(ckpt_path: Path, input_ids, labels):  # type: ignore[no-untyped-def]
    """An independent reference for per-token statistics: the checkpoint's GPT run entirely in
    float64 and torch's own F.cross_entropy / softmax over the (padded) tied head, as slm trains.
    Returns (loss, entropy), float64 arrays shaped like ``labels``."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from slm_cli.model.gpt import GPT, GPTConfig

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(**ckpt["slm"]["model"]))
    model.load_state_dict({k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")})
    model = model.double().eval()
    with torch.no_grad():
        hidden = model(torch.as_tensor(np.asarray(input_ids)))  # (B, T, d): ln_f of the last block
        logits = hidden @ model.lm_head.weight.T
        flat = logits.reshape(-1, logits.shape[-1])
        y = torch.as_tensor(np.asarray(labels)).reshape(-1)
        loss = F.cross_entropy(flat, y, reduction="none")
        entropy = -(F.softmax(flat, -1) * F.log_softmax(flat, -1)).sum(-1)
    shape = np.asarray(labels).shape
    return loss.reshape(shape).numpy(), entropy.reshape(shape).numpy()


def select_as_training(strategy, stats, batch, accumulate: int = 1):  # type: ignore[no-untyped-def]
    """One micro-batch's selection made as the training step makes it on one device
    (slm_cli/selection/scope.py, the default micro_batch scope), then the step's update of an
    adaptive strategy: a Selected with the mask and every logged metric."""
    from slm_cli.selection.base import Selected
    from slm_cli.selection.scope import ONE_DEVICE, build_scope

    scope = build_scope("micro_batch", strategy, accumulate)
    features = strategy.features(stats, batch)
    choice = scope.choose(0, features, ONE_DEVICE)
    adapted = strategy.update(scope.step_features([features], ONE_DEVICE))
    return Selected(mask=choice.mask, metrics={**choice.metrics, **adapted})


# summary.json keys as runs wrote them before the FLOPs figures were renamed (today's -> earlier).
EARLIER_KEYS = {"flops_realized": "flops_total", "flops_clm": "flops_clm_equivalent",
                "flops_saved_frac_nominal": "flops_saved_frac"}
EARLIEST_OTHER_KEYS = {"steps", "train_tokens", "selected_tokens", "val_loss", "val_ppl", "train_tokens_per_s",
                       "wall_s", "selection", "model", "params", "data", "checkpoint"}


def earlier_summary(summary: dict) -> dict:
    """A summary.json as the oldest runs left it: the FLOPs under their earlier names, without
    flops_nominal, the realised saved fraction or any key added since."""
    return {EARLIER_KEYS.get(k, k): v for k, v in summary.items() if k in EARLIER_KEYS or k in EARLIEST_OTHER_KEYS}
