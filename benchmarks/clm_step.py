"""clm_step: slm's CLM training step (`slm train`, Lightning) vs a minimal plain-PyTorch loop on the same
work, the two run in pairs step by step; goal: tokens/s slm / plain >= 0.95."""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.common import (
    CACHE_DIR,
    Benchmark,
    compose_train,
    corpus_overrides,
    table,
    timing_setup,
)

if TYPE_CHECKING:
    import lightning as L
    from omegaconf import DictConfig

CLM_FULL = {"model": "gpt2-micro", "batch_size": 4, "rounds": 3, "steps": 30, "warmup": 3}
CLM_QUICK = {"model": "gpt2-nano", "batch_size": 8, "rounds": 2, "steps": 15, "warmup": 2}


class PlainLoop:
    """The minimal nanoGPT loop on the same model, init, windows, optimizer and schedule as slm.

    ``step()`` is one iteration (fetch the batch, full logits, F.cross_entropy, backward, clip,
    AdamW, zero_grad, LR schedule) and returns its wall time and loss; a standalone plain run is
    ``for _ in range(n): loop.step()``.
    """

    def __init__(self, cfg: DictConfig) -> None:
        import torch

        from slm_cli import optim
        from slm_cli.data.prepare import prepare
        from slm_cli.data.windows import StepSampler, TrainWindows
        from slm_cli.model.gpt import GPT
        from slm_cli.run import model_config

        prepared = prepare(cfg.data, cfg.paths)
        gpt = model_config(cfg, prepared)
        torch.manual_seed(cfg.seed)  # what train()'s L.seed_everything does for the CPU generator
        self.model = GPT(gpt).train()
        self.opt, self.sched = optim.build(self.model.param_groups(cfg.optim.weight_decay), cfg.optim,
                                           cfg.optim.decay_steps or cfg.trainer.max_steps)
        self.windows = TrainWindows(prepared.tokens("train"), gpt.block_size, cfg.seed)
        self.sampler = iter(StepSampler(cfg.data.batch_size))
        self.params = list(self.model.parameters())
        self.grad_clip = cfg.optim.grad_clip

    def step(self) -> tuple[float, float]:
        import torch
        import torch.nn.functional as F

        t0 = time.perf_counter()
        batch = self.windows[next(self.sampler)]
        x, y = batch["input_ids"], batch["labels"]
        logits = self.model.logits(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        value = loss.item()
        return time.perf_counter() - t0, value


def _interleaved_clock(plain: PlainLoop, plain_first: bool) -> L.Callback:
    """A Lightning callback that times slm's steps and runs one plain step next to each of them.

    Pairing the two sides step by step puts both under the same load on a shared machine. An slm
    iteration is timed end to end (end of batch i-1 -> end of batch i, minus the plain step run in
    between), so it includes the loader fetch and every hook and logger call Lightning makes per
    step, not only training_step. ``plain_first`` runs the plain step before slm's step of the pair
    (in on_train_batch_start) instead of after it (on_train_batch_end).
    """
    import lightning as L
    import torch

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.slm_iter: list[float] = []
            self.slm_step: list[float] = []
            self.slm_loss: list[float] = []
            self.plain_iter: list[float] = []
            self.plain_loss: list[float] = []
            self.threads = 0
            self._mark = self._start = 0.0
            self._excluded = 0.0

        def _plain_step(self) -> None:
            seconds, loss = plain.step()
            self.plain_iter.append(seconds)
            self.plain_loss.append(loss)
            self._excluded += seconds

        def on_train_start(self, trainer, pl_module) -> None:
            self.threads = torch.get_num_threads()
            self._mark = time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if plain_first:
                self._plain_step()
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            t = time.perf_counter()
            self.slm_iter.append(t - self._mark - self._excluded)
            self.slm_step.append(t - self._start)
            self.slm_loss.append(float(trainer.callback_metrics["train/loss"]))
            self._excluded = 0.0
            if not plain_first:
                self._plain_step()
                self._excluded = 0.0
            self._mark = time.perf_counter()

    return Clock()


def _paired_round(overrides: list[str], run_dir: Path, plain_first: bool) -> L.Callback:
    """`slm_cli.run.train(cfg)`, the real path, with the pairing clock added to its Trainer."""
    import slm_cli.run as slm_run

    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run dir per round (and no stale logs)
    cfg = compose_train([*overrides, f"paths.output_dir={run_dir}", f"paths.log_dir={run_dir.parent}"])
    clock = _interleaved_clock(PlainLoop(cfg), plain_first)
    slm_run.train(cfg, callbacks=[clock])
    return clock


def clm_step(quick: bool) -> dict[str, Any]:
    p = CLM_QUICK if quick else CLM_FULL
    threads = timing_setup()  # = nproc
    corpus, data = corpus_overrides()
    n_steps = p["warmup"] + p["steps"]
    overrides = [
        *data, f"model={p['model']}", f"data.batch_size={p['batch_size']}", "seed=1337",
        f"trainer.max_steps={n_steps}", f"trainer.val_check_interval={n_steps}", "trainer.limit_val_batches=1",
        f"trainer.checkpoint_every_n_steps={10**9}", "trainer.enable_progress_bar=false", "logger=csv",
    ]
    cfg = compose_train(overrides)
    from slm_cli.data.prepare import prepare

    t0 = time.perf_counter()
    prepared = prepare(cfg.data, cfg.paths)  # cached in benchmarks/.cache/data after the first run
    prepare_s = time.perf_counter() - t0
    tokens_per_step = cfg.data.batch_size * cfg.model.block_size
    print(f"corpus: {corpus} -> {prepared.dir} ({prepared.meta['train_tokens']:,} train tokens, "
          f"vocab {prepared.vocab_size}; prepare {prepare_s:.1f}s)")
    print(f"model: {p['model']} (L={cfg.model.n_layer} H={cfg.model.n_head} d={cfg.model.n_embd} "
          f"T={cfg.model.block_size}), B={cfg.data.batch_size} -> {tokens_per_step} tokens/step; "
          f"torch threads {threads}; {p['rounds']} rounds x {p['steps']} timed steps per side "
          f"(+{p['warmup']} warmup steps, not timed)")

    w = p["warmup"]
    slm_iters: list[float] = []
    slm_steps: list[float] = []
    plain_iters: list[float] = []
    rows, per_round, losses = [], [], []
    for r in range(p["rounds"]):
        plain_first = r % 2 == 1  # alternate which side goes first in each pair
        clock = _paired_round(overrides, CACHE_DIR / "runs" / "clm_step" / f"round{r}", plain_first)
        if clock.threads != threads:
            raise RuntimeError(f"torch threads changed under Lightning: {clock.threads} != {threads}")
        it, st, pit = clock.slm_iter[w:], clock.slm_step[w:], clock.plain_iter[w:]
        slm_iters += it
        slm_steps += st
        plain_iters += pit
        s_med, p_med = statistics.median(it), statistics.median(pit)
        per_round.append(p_med / s_med)
        losses.append((clock.slm_loss, clock.plain_loss))
        rows.append([f"round {r + 1} ({'plain' if plain_first else 'slm'} first)", f"{s_med * 1e3:.0f}",
                     f"{statistics.median(st) * 1e3:.0f}", f"{p_med * 1e3:.0f}", f"{p_med / s_med:.3f}"])

    s_med, p_med = statistics.median(slm_iters), statistics.median(plain_iters)
    step_med = statistics.median(slm_steps)
    ratio = p_med / s_med
    paired = statistics.median(b / a for a, b in zip(slm_iters, plain_iters, strict=True))
    rows.append(["all rounds", f"{s_med * 1e3:.0f}", f"{step_med * 1e3:.0f}", f"{p_med * 1e3:.0f}", f"{ratio:.3f}"])
    print()
    print(table(["median per step", "slm ms/iter", "slm ms/training_step", "plain ms/iter",
                 "tokens/s slm / plain"], rows))
    print(f"\ntokens/s: slm {tokens_per_step / s_med:,.0f}, plain {tokens_per_step / p_med:,.0f}: "
          f"ratio {ratio:.3f} (goal >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'}); "
          f"median of the {len(slm_iters)} paired step ratios {paired:.3f}")
    print("slm ms/iter: end of batch i-1 -> end of batch i (loader + Lightning hooks + logging + training_step); "
          "slm ms/training_step: on_train_batch_start -> on_train_batch_end; plain ms/iter: batch fetch -> "
          "sched.step()")

    # Same work: the same init and windows must give (nearly) the same loss curve on both sides.
    first_diff = max(abs(sl[0] - pl[0]) for sl, pl in losses)
    last_diff = max(abs(sl[-1] - pl[-1]) for sl, pl in losses)
    s_last, p_last = losses[-1][0][-1], losses[-1][1][-1]
    print(f"training loss: step 1 slm {losses[-1][0][0]:.4f} plain {losses[-1][1][0]:.4f}; step {n_steps} "
          f"slm {s_last:.4f} plain {p_last:.4f} (max |diff| over rounds: step 1 {first_diff:.1e}, "
          f"step {n_steps} {last_diff:.1e})")
    if first_diff > 1e-4 or last_diff > 1e-2 * max(1.0, abs(p_last)):
        raise AssertionError(f"slm and the plain loop disagree on the training loss (step 1: {first_diff:.2e}, "
                             f"step {n_steps}: {last_diff:.2e}): they are not doing the same work")

    return {
        "quick": quick, "corpus": corpus, "model": p["model"], "n_layer": cfg.model.n_layer,
        "n_head": cfg.model.n_head, "n_embd": cfg.model.n_embd, "block_size": cfg.model.block_size,
        "batch_size": cfg.data.batch_size, "vocab_size": prepared.vocab_size, "tokens_per_step": tokens_per_step,
        "rounds": p["rounds"], "timed_steps_per_round": p["steps"], "warmup_steps": w,
        "slm_ms_per_iter": s_med * 1e3, "slm_ms_per_training_step": step_med * 1e3, "plain_ms_per_iter": p_med * 1e3,
        "slm_tokens_per_s": tokens_per_step / s_med, "plain_tokens_per_s": tokens_per_step / p_med,
        "ratio": ratio, "ratio_per_round": per_round, "ratio_paired_median": paired, "goal": 0.95,
        "loss_slm": s_last, "loss_plain": p_last, "loss_max_abs_diff_first": first_diff,
        "loss_max_abs_diff_last": last_diff,
    }



BENCHMARK = Benchmark("clm_step", "slm CLM training step (slm train, Lightning) vs a minimal plain-PyTorch loop",
                      clm_step)
