"""`slm train`: compose the components, fit, and write the run's summary.

Like lightning-hydra-template's train.py: check the config, prepare data, instantiate, fit, report.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from slm_cli import flops
from slm_cli.config import check_train
from slm_cli.data.module import SLMDataModule
from slm_cli.data.prepare import PreparedData, prepare
from slm_cli.errors import SlmError
from slm_cli.model.gpt import GPTConfig
from slm_cli.module import SLMModule
from slm_cli.outputs import AtomicCheckpointIO, load_checkpoint, read_metrics, write_json, write_metrics
from slm_cli.parallel import check_launcher
from slm_cli.selection.base import Selection
from slm_cli.targets.base import Target

log = logging.getLogger(__name__)

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


def model_config(cfg: DictConfig, prepared: PreparedData) -> GPTConfig:
    """The GPT settings for this run; the vocabulary is the tokenizer's unless set explicitly."""
    vocab = prepared.vocab_size
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < vocab:
        raise SlmError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                       f"({vocab}, {prepared.dir}): set model.vocab_size=null to use the tokenizer's")
    return GPTConfig(block_size=cfg.model.block_size, vocab_size=cfg.model.vocab_size or vocab,
                     n_layer=cfg.model.n_layer, n_head=cfg.model.n_head, n_embd=cfg.model.n_embd,
                     dropout=cfg.model.dropout, bias=cfg.model.bias)


def check_resume(ckpt: dict[str, Any], gpt: GPTConfig, prepared: PreparedData, path: str) -> None:
    """A checkpoint resumes only with the model and tokenizer it was trained with."""
    from dataclasses import asdict

    from slm_cli.data.tokenizer import load_tokenizer, tokenizer_sha256

    saved = ckpt["slm"]["model"]
    diff = {k: (saved.get(k), v) for k, v in asdict(gpt).items() if saved.get(k) != v}
    if diff:
        pairs = ", ".join(f"model.{k}={new} (checkpoint: {old})" for k, (old, new) in diff.items())
        raise SlmError(f"checkpoint {path} does not match this model: {pairs}: pass the checkpoint's model "
                       "settings, or start a new run without ckpt_path")
    from tokenizers import Tokenizer

    ckpt_sha = tokenizer_sha256(Tokenizer.from_str(ckpt["slm"]["tokenizer_json"]))
    data_sha = tokenizer_sha256(load_tokenizer(str(prepared.tokenizer_path)))
    if ckpt_sha != data_sha:
        raise SlmError(f"checkpoint {path} was trained with another tokenizer than {prepared.dir}: "
                       f"prepare the data with data.tokenizer={path}")


def build_trainer(cfg: DictConfig, run_dir: Path) -> L.Trainer:
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
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy,
        precision=t.precision, max_steps=t.max_steps, val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None, num_sanity_val_steps=0, log_every_n_steps=t.log_every_n_steps,
        logger=loggers, callbacks=[checkpoints, throughput], enable_progress_bar=t.enable_progress_bar,
        deterministic=t.deterministic, use_distributed_sampler=False, plugins=plugins,
        default_root_dir=run_dir, enable_model_summary=False,
    )


def build(component_cfg: DictConfig) -> Any:
    """A strategy or target named by its YAML's `_target_`; its constructor checks its own values."""
    from hydra.errors import InstantiationException

    try:
        return instantiate(component_cfg)
    except InstantiationException as exc:  # Hydra wraps the constructor's error; report that one
        if isinstance(exc.__cause__, SlmError):
            raise exc.__cause__ from None
        raise


def resume_path(cfg: DictConfig, run_dir: Path) -> str | None:
    """ckpt_path, or else this run dir's own last.ckpt: a run dir that already holds one belongs
    to a job that was interrupted and restarted (a requeued SLURM job keeps its run dir), so it
    continues where it stopped. Data order depends on (seed, step) only, so the result is the
    same as without the interruption."""
    if cfg.ckpt_path:
        return str(cfg.ckpt_path)
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.exists():
        log.info(f"resuming from {last} (this run dir's own checkpoint)")
        return str(last)
    return None


def setup(
    cfg: DictConfig, run_dir: Path, ckpt_path: str | None
) -> tuple[L.Trainer, SLMModule, SLMDataModule, Selection, PreparedData]:
    """Check everything that can be checked before training starts, and build the pieces."""
    check_launcher()
    check_train(cfg)
    resume = load_checkpoint(ckpt_path, tensors=False) if ckpt_path else None
    prepared = prepare(cfg.data, cfg.paths)
    gpt = model_config(cfg, prepared)
    for split in ("train", "val"):
        n = prepared.meta[f"{split}_tokens"]
        if n < gpt.block_size + 1:
            raise SlmError(f"model.block_size={gpt.block_size} needs at least {gpt.block_size + 1} tokens but the "
                           f"{split} split of {prepared.dir} has {n}: lower model.block_size or use a larger corpus")
    resume_step = 0
    if resume is not None:
        check_resume(resume, gpt, prepared, ckpt_path)
        resume_step = int(resume.get("global_step", 0))
    del resume

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    # selection.scope belongs to the training loop, not to the strategy (docs/scaling.md).
    selection: Selection = build(OmegaConf.masked_copy(cfg.selection, [k for k in cfg.selection if k != "scope"]))
    target: Target = build(cfg.target)
    module = SLMModule(
        gpt, cfg.optim, selection, target=target, scope=cfg.selection.scope, max_steps=cfg.trainer.max_steps,
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches, chunk_size=cfg.loss.chunk_size,
        keep_probs=cfg.loss.keep_probs, compile=cfg.trainer.compile, tokenizer_json=prepared.tokenizer_path.read_text(),
        run_config=OmegaConf.to_container(cfg, resolve=True),
    )
    datamodule = SLMDataModule(
        prepared, block_size=gpt.block_size, batch_size=cfg.data.batch_size, seed=cfg.seed,
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches, num_workers=cfg.data.num_workers,
        val_batches=cfg.trainer.limit_val_batches, aligned=selection.aligned(prepared) | target.aligned(prepared),
    )
    trainer = build_trainer(cfg, run_dir)
    if resume_step and trainer.is_global_zero:
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                continue_metrics(logger, resume_step)
    return trainer, module, datamodule, selection, prepared


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


def discard_unstarted(run_dir: Path) -> None:
    """A run that failed before training holds only Hydra's config and log: remove it, so that no
    run dir looks like a run that happened."""
    if run_dir.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


def train(cfg: DictConfig) -> dict[str, Any]:
    t_start = time.perf_counter()
    run_dir = Path(cfg.paths.output_dir)
    ckpt_path = resume_path(cfg, run_dir)
    try:
        trainer, module, datamodule, selection, prepared = setup(cfg, run_dir, ckpt_path)
    except SlmError:
        discard_unstarted(run_dir)
        raise
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if module.val_step != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    last = run_dir / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(last, weights_only=False)  # the full state, so the run can be extended

    c = module.counters
    summary = {
        "steps": trainer.global_step,
        "train_tokens": int(c["train_tokens"]),
        "selected_tokens": int(c["selected_tokens"]),
        "val_loss": module.val_loss,
        "val_ppl": math.exp(min(module.val_loss, 700.0)),
        "flops_total": c["flops_realized"],
        "flops_nominal": c["flops_nominal"],
        "flops_clm_equivalent": c["flops_clm"],
        "flops_saved_frac": flops.saved_frac(c["flops_nominal"], c["flops_clm"]),
        "flops_saved_frac_realized": flops.saved_frac(c["flops_realized"], c["flops_clm"]),
        "train_tokens_per_s": module.tokens_this_run / module.train_seconds if module.train_seconds else 0.0,
        "wall_s": time.perf_counter() - t_start,
        "selection": selection.name,
        "target": module.target.name,
        "model": cfg.model.name,
        "params": module.model.num_params(),
        "data": str(prepared.dir),
        "checkpoint": str(last),
    }
    if trainer.is_global_zero:
        write_json(run_dir / "summary.json", summary)
        print(f"run: {run_dir}\nval_loss {summary['val_loss']:.4f}  val_ppl {summary['val_ppl']:.2f}  "
              f"steps {summary['steps']}  tokens {summary['train_tokens']}  "
              f"{summary['train_tokens_per_s']:.0f} tokens/s  wall {summary['wall_s']:.0f}s")
    return summary
