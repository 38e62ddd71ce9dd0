"""`slm train`: compose the components, fit, and write the run's summary.

Like lightning-hydra-template's train.py: check the config, prepare data, instantiate, fit, report.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from slm_cli import estimate
from slm_cli.budget import Budget, resolve_hardware
from slm_cli.budget import apply as apply_budget
from slm_cli.config import build, check_train, positive_int_or_null
from slm_cli.data.module import SLMDataModule
from slm_cli.data.prepare import prepare
from slm_cli.data.prepared import PreparedData
from slm_cli.data.windows import check_length
from slm_cli.errors import SlmError
from slm_cli.loss import perplexity
from slm_cli.model.export import export
from slm_cli.model.gpt import GPTConfig
from slm_cli.model.hf import require_hf
from slm_cli.model.load import init_weights
from slm_cli.module import SLMModule
from slm_cli.outputs import load_checkpoint, write_json
from slm_cli.selection.base import Selection
from slm_cli.summary import RunSummary
from slm_cli.summary import read as read_summary
from slm_cli.target.base import Target
from slm_cli.trainer import build_trainer, finish_loggers

log = logging.getLogger(__name__)

def model_config(cfg: DictConfig, prepared: PreparedData) -> GPTConfig:
    """The GPT settings for this run (conf/model/, whose `_target_` is GPTConfig); the vocabulary
    is the tokenizer's unless set explicitly. `name` labels the size and is not a setting."""
    vocab = prepared.vocab_size
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < vocab:
        raise SlmError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                       f"({vocab}, {prepared.dir}): set model.vocab_size=null to use the tokenizer's")
    return gpt_config(cfg, cfg.model.vocab_size or vocab)


def gpt_config(cfg: DictConfig, vocab_size: int) -> GPTConfig:
    """conf/model/ instantiated (its `_target_` is GPTConfig) with this vocabulary."""
    settings = OmegaConf.masked_copy(cfg.model, [k for k in cfg.model if k not in ("name", "vocab_size")])
    return instantiate(settings, vocab_size=vocab_size)


def check_resume(ckpt: dict[str, Any], gpt: GPTConfig, prepared: PreparedData, key: str, spec: str) -> None:
    """A checkpoint resumes only with the model and tokenizer it was trained with. ``key=spec`` is
    the setting that chose it: ``ckpt_path``, or ``hydra.run.dir`` when the run dir's own
    last.ckpt resumes (:func:`resume_path`); the errors name that setting and its fix."""
    from dataclasses import asdict

    from slm_cli.model.load import TokenizerId, check_tokenizer

    fix = ("start a new run without ckpt_path" if key == "ckpt_path" else
           f"start a new run in another {key} (this one holds checkpoints/last.ckpt, which resumes)")
    saved = ckpt["slm"]["model"]
    diff = {k: (saved.get(k), v) for k, v in asdict(gpt).items() if saved.get(k) != v}
    if diff:
        pairs = ", ".join(f"model.{k}={new} (checkpoint: {old})" for k, (old, new) in diff.items())
        raise SlmError(f"{key}={spec} holds a checkpoint that does not match this model: {pairs}: pass the "
                       f"checkpoint's model settings, or {fix}")
    check_tokenizer(TokenizerId.of_json(ckpt["slm"]["tokenizer_json"], f"{key}={spec}"),
                    TokenizerId.of_data(prepared), key=key, spec=spec,
                    fix=f"prepare the data with data.tokenizer={spec}" if key == "ckpt_path" else fix)


def resume_path(cfg: DictConfig, run_dir: Path) -> str | None:
    """ckpt_path, or else this run dir's own last.ckpt: a run dir that already holds one belongs
    to a job that was interrupted and restarted (a requeued SLURM job keeps its run dir), so it
    continues where it stopped. Data order depends on (seed, step) only, so the result is the
    same as without the interruption."""
    if cfg.ckpt_path:
        return str(cfg.ckpt_path)
    last = run_dir / "checkpoints" / "last.ckpt"
    return str(last) if last.exists() else None


def resolve_config(cfg: DictConfig) -> Budget:
    """The config's values checked, `auto` hardware picked and the budget written back."""
    resolve_hardware(cfg)
    check_train(cfg)
    return apply_budget(cfg)


def dry_run(cfg: DictConfig) -> dict[str, Any]:
    """`slm train dry_run=true`: the plan, printed, without preparing data or training."""
    budget = resolve_config(cfg)
    vocab, source = estimate.vocab_size(cfg)
    gpt = gpt_config(cfg, vocab)
    # The strategy and target as training builds them: what they keep, and any model they run
    # (an online reference, a KD teacher), is counted from them.
    figures = estimate.make(cfg, gpt, budget, build(cfg.selection), build(cfg.target))
    print(f"plan (vocabulary from {source}):\n{estimate.describe(figures, cfg)}")
    capacity, what = estimate.device_memory(cfg.trainer.accelerator)
    verdict = "fits" if figures["memory_total"] <= capacity else "does NOT fit"
    print(f"memory      {figures['memory_total'] / estimate.GIB:.2f} GiB {verdict} in the {what} "
          f"({capacity / estimate.GIB:.1f} GiB)")
    if cfg.get("plan_out"):
        write_json(cfg.plan_out, figures)
    return figures


def setup(
    cfg: DictConfig, run_dir: Path, ckpt_path: str | None, callbacks: Sequence[L.Callback] = ()
) -> tuple[L.Trainer, SLMModule, SLMDataModule, Selection, PreparedData]:
    """Check everything that can be checked before training starts, and build the pieces."""
    budget = resolve_config(cfg)
    selection: Selection = build(cfg.selection)
    target: Target = build(cfg.target)
    # Memory first, from the configured vocabulary: a run that cannot fit stops before preparing data.
    gpt = gpt_config(cfg, estimate.vocab_size(cfg)[0])
    estimate.check_fits(estimate.make(cfg, gpt, budget, selection, target), cfg)
    resume_key, resume_spec = ("ckpt_path", str(ckpt_path)) if cfg.ckpt_path else ("hydra.run.dir", str(run_dir))
    resume = load_checkpoint(ckpt_path, tensors=False, key=resume_key) if ckpt_path else None
    prepared = prepare(cfg.data, cfg.paths)
    gpt = model_config(cfg, prepared)
    for split in ("train", "val"):
        check_length(prepared.meta[f"{split}_tokens"], gpt.block_size, f"the {split} split of {prepared.dir}")
    resume_step = 0
    if resume is not None:
        check_resume(resume, gpt, prepared, resume_key, resume_spec)
        resume_step = int(resume.get("global_step", 0))
    del resume

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = SLMModule(
        gpt, cfg.optim, selection, target=target, scope=cfg.trainer.selection_scope,
        selection_start_step=cfg.trainer.selection_start_step, max_steps=cfg.trainer.max_steps,
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches, chunk_size=cfg.loss.chunk_size,
        keep_probs=cfg.loss.keep_probs, compile=cfg.trainer.compile, tokenizer_json=prepared.tokenizer_path.read_text(),
        run_config=OmegaConf.to_container(cfg, resolve=True),
    )
    token_arrays = selection.token_arrays(prepared) | target.token_arrays(prepared)
    check_target_memory(target, cfg.data.batch_size * gpt.block_size, cfg.loss.max_target_mb)
    if cfg.init_from:  # weights only: the optimizer, step and counters start afresh (docs/interop.md)
        log.info(f"init_from={cfg.init_from} ignored: resuming from {ckpt_path}" if ckpt_path
                 else init_weights(module.model, str(cfg.init_from), module.tokenizer_json))
    if cfg.trainer.export_at_end:
        require_hf("trainer.export_at_end=true")  # fail now, not after training
    datamodule = SLMDataModule(
        prepared, block_size=gpt.block_size, batch_size=cfg.data.batch_size, seed=cfg.seed,
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches, num_workers=cfg.data.num_workers,
        val_batches=cfg.trainer.limit_val_batches, token_arrays=token_arrays,
        window_grid=window_grid(selection, cfg.data.get("window_grid"), gpt.block_size),
    )
    trainer = build_trainer(cfg, run_dir, resume_step=resume_step, callbacks=callbacks)
    return trainer, module, datamodule, selection, prepared


def window_grid(selection: Selection, configured: int | None, block_size: int) -> int | None:
    """Where training windows may start: the strategy's grid (RHO-1's precomputed scores), else
    data.window_grid (the same grid for a baseline), else anywhere."""
    required = selection.window_grid(block_size)
    if configured is not None:
        configured = positive_int_or_null("data.window_grid", configured, example=block_size)
        if required is not None and configured != required:
            raise SlmError(f"data.window_grid={configured} but selection={selection.name} trains on the grid of its "
                           f"scores ({required} tokens): set data.window_grid={required} or null")
    return required or configured


def check_target_memory(target: Target, rows: int, limit_mb: int) -> None:
    """A micro-batch's (rows, K) sparse targets (int64 ids, float32 probabilities) must fit the
    budget; AllNTs' K is the most continuations of any context, which can reach the vocabulary."""
    entries = target.max_entries()
    need_mb = rows * entries * 12 / 2**20
    if need_mb > limit_mb:
        raise SlmError(f"target={target.name} needs up to {entries} entries per token, {need_mb:,.0f} MB of targets "
                       f"per micro-batch of {rows} tokens, above loss.max_target_mb={limit_mb}: lower data.batch_size "
                       "(with trainer.accumulate_grad_batches to keep the global batch), use target=coconts, "
                       "or raise loss.max_target_mb")


def discard_unstarted(run_dir: Path) -> None:
    """A run that failed before training holds only Hydra's config and log: remove it, so that no
    run dir looks like a run that happened."""
    if run_dir.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


def finished_before(cfg: DictConfig, run_dir: Path, max_steps: int) -> dict[str, Any] | None:
    """The summary of a run dir that already finished this run (its summary.json at max_steps or
    beyond), when no ckpt_path asks to go on from elsewhere: the same command run again (a
    resubmitted sweep, a requeued job that had finished) keeps that run as it is, instead of
    resuming for no step and writing this process's figures (no tokens, a few seconds) over it."""
    if cfg.ckpt_path or max_steps < 1 or not (run_dir / "summary.json").is_file():
        return None
    try:
        summary = read_summary(run_dir)
    except (OSError, ValueError):
        return None  # unreadable: the run resumes from its last.ckpt and writes it again
    if summary.steps is None or summary.steps < max_steps:
        return None  # a longer max_steps extends the run
    print(f"run: {run_dir} finished before (step {summary.steps} of max_steps {max_steps}): summary.json kept")
    return summary.to_dict()


def train(cfg: DictConfig, callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:
    t_start = time.perf_counter()
    run_dir = Path(cfg.paths.output_dir)
    ckpt_path = resume_path(cfg, run_dir)
    try:
        trainer, module, datamodule, selection, prepared = setup(cfg, run_dir, ckpt_path, callbacks)
    except SlmError:
        discard_unstarted(run_dir)
        raise
    kept = finished_before(cfg, run_dir, trainer.max_steps)
    if kept is not None:
        finish_loggers(trainer)
        return kept
    if ckpt_path and not cfg.ckpt_path:
        log.info(f"resuming from {ckpt_path} (this run dir's own checkpoint)")
    # A preempted run (SIGTERM, or SLURM's warning before a time limit) does not come back from fit:
    # slm_cli/preemption.py saves last.ckpt at the step reached and exits for the requeue, so what
    # follows (final validation, last.ckpt, summary.json) runs only for a finished run.
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if module.val_step != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    last = run_dir / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(last, weights_only=False)  # the full state, so the run can be extended

    summary = RunSummary.from_run(
        module.counters.state_dict(), selection.scoring_flops(), steps=trainer.global_step, val_loss=module.val_loss,
        val_ppl=perplexity(module.val_loss), val_sources=module.val_source_losses,
        train_tokens_per_s=module.tokens_this_run / module.train_seconds if module.train_seconds else 0.0,
        wall_s=time.perf_counter() - t_start, selection=selection.name, target=module.target.name,
        model=cfg.model.name, params=module.model.num_params(), data=str(prepared.dir), checkpoint=str(last))
    if trainer.is_global_zero:
        summary.write(run_dir)
        if cfg.trainer.export_at_end:
            log.info(f"exported the final model to {export(last, run_dir / 'hf', replace=True)}")
        print(f"run: {run_dir}\nval_loss {summary.val_loss:.4f}  val_ppl {summary.val_ppl:.2f}  "
              f"steps {summary.steps}  tokens {summary.train_tokens}  "
              f"FLOPs saved {summary.flops_saved_frac_realized:.1%} realised "
              f"({summary.flops_saved_frac_nominal:.1%} nominal)  "
              f"{summary.train_tokens_per_s:.0f} tokens/s  wall {summary.wall_s:.0f}s")
    finish_loggers(trainer)
    return summary.to_dict()
