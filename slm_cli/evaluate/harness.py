"""`slm eval ckpt_path=... tasks=...`: downstream tasks through lm-evaluation-harness (lm-eval).

:class:`SlmLM` is an lm-eval ``LM`` (registered as ``"slm"``) around slm's own GPT and the tokenizer
its checkpoint carries, with no export to another format: ``loglikelihood`` (multiple-choice and
cloze tasks), ``loglikelihood_rolling`` (perplexity tasks) and greedy ``generate_until``. Inputs
longer than the model's ``block_size`` keep their last ``block_size`` tokens, as lm-eval's own
models do. :func:`evaluate_tasks` runs lm-eval's ``simple_evaluate`` on slm's local tasks
(slm_cli/evaluate/tasks/, no network) or on any task of the harness (those download their data),
writes the harness's results as JSON into the run dir and prints a table.

lm-eval is an optional extra (``pip install 'slm[eval]'``): without it, importing this module raises
a one-line :class:`SlmError`.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig
from tokenizers import Tokenizer
from tqdm import tqdm

from slm_cli.config import is_int, is_number
from slm_cli.data.tokenizer import eos_id
from slm_cli.errors import SlmError
from slm_cli.evaluate.local_tasks import local_task_names, tasks_dir
from slm_cli.model.gpt import GPT
from slm_cli.model.load import checkpoint_file, load_model
from slm_cli.outputs import load_checkpoint, write_json

INSTALL = "pip install 'slm[eval]'"
# 0.4.12 is the first release whose task YAMLs may name an importable `!function` and whose tasks
# carry their YAML's path (`config_source`), which slm's local tasks need to find their data.
MIN_VERSION = (0, 4, 12)

try:
    import lm_eval
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as exc:
    raise SlmError(f"tasks=... needs lm-evaluation-harness, an optional extra ({exc}): {INSTALL}") from None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


if _version(lm_eval.__version__) < MIN_VERSION:
    raise SlmError(f"lm-eval {lm_eval.__version__} is older than slm's task files need "
                   f"({'.'.join(map(str, MIN_VERSION))}): {INSTALL}")


def from_checkpoint(ckpt: dict[str, Any]) -> tuple[GPT, Tokenizer, str | None]:
    """The model, tokenizer and end-of-text token (null: the tokenizer's usual one) of a loaded checkpoint."""
    data = (ckpt["slm"].get("config") or {}).get("data") or {}
    return load_model(ckpt), Tokenizer.from_str(ckpt["slm"]["tokenizer_json"]), data.get("eos_token")


@register_model("slm")
class SlmLM(TemplateLM):
    """slm's GPT as an lm-eval model: ``lm_eval.simple_evaluate(model="slm", model_args={"ckpt_path":
    ...})`` once this module is imported, or ``SlmLM(model=gpt, tokenizer=tok)`` in Python."""

    def __init__(self, ckpt_path: str | None = None, batch_size: int | str = 16, device: str | None = None,
                 model: GPT | None = None, tokenizer: Tokenizer | None = None, eos_token: str | None = None,
                 **_: Any) -> None:  # lm-eval also passes max_batch_size, which a fixed batch ignores
        super().__init__()
        if model is None or tokenizer is None:
            if ckpt_path is None:
                raise SlmError("the slm lm-eval model needs ckpt_path=<run dir or checkpoint>")
            model, tokenizer, eos_token = from_checkpoint(load_checkpoint(checkpoint_file(ckpt_path)))
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise SlmError(f"batch_size={batch_size} is not a positive integer: set e.g. batch_size=16")
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self._device)
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        # Training appends this token after every document, so it is the model's "start of text" too.
        self._eot = eos_id(tokenizer, eos_token)

    # ---- what TemplateLM builds on ------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_: Any) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def get_model_info(self) -> dict[str, Any]:
        return {"model_num_parameters": self.model.num_params(), "block_size": self.max_length}

    @torch.no_grad()
    def _log_probs(self, rows: list[list[int]], n_scored: list[int]) -> list[torch.Tensor]:
        """Per row, the log-softmax over the real vocabulary at its last ``n`` positions, (n, V).

        Rows are right-padded into one batch: under causal attention a position never sees the
        padding after it. Only the scored positions go through the LM head, so a (B, T, V) tensor
        is never built."""
        width = max(map(len, rows))
        batch = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            batch[i, : len(row)] = torch.tensor(row)
        hidden = self.model(batch.to(self._device))
        picked = torch.cat([hidden[i, len(row) - n: len(row)]
                            for i, (row, n) in enumerate(zip(rows, n_scored, strict=True))])
        weight = self.model.lm_head.weight[: self.model.config.vocab_size]  # padded rows are no tokens
        log_probs = F.log_softmax((picked @ weight.T).float(), dim=-1).cpu()
        return list(log_probs.split(n_scored))

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **_: Any) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding gives the continuation) per request.

        The model reads at most ``block_size`` tokens: a row is the last ``block_size`` tokens before
        the end of the continuation (the context cropped on the left), as in lm-eval's own models. A
        continuation longer than that is scored in consecutive pieces of ``block_size`` tokens, each
        read with the tokens just before it (as lm-eval's rolling windows split a document)."""
        block = self.max_length
        pieces = []  # (request index, row, number of scored tokens at the row's end, those tokens)
        for r, (_, context, continuation) in enumerate(requests):
            tokens = context + continuation
            for start in range(len(context), len(tokens), block):
                end = min(start + block, len(tokens))
                pieces.append((r, tokens[:end][-(block + 1):][:-1], end - start, tokens[start:end]))
        logprob = [0.0] * len(requests)
        greedy = [True] * len(requests)
        # Longest first, as lm-eval's models do: batches of similar lengths, and the largest batch first,
        # so running out of memory shows at once.
        pieces.sort(key=lambda piece: -len(piece[1]))
        for start in tqdm(range(0, len(pieces), self.batch_size), disable=disable_tqdm, desc="slm loglikelihood"):
            batch = pieces[start: start + self.batch_size]
            log_probs = self._log_probs([row for _, row, _, _ in batch], [n for _, _, n, _ in batch])
            for (r, _, _, scored), lp in zip(batch, log_probs, strict=True):
                target = torch.tensor(scored)
                logprob[r] += float(lp.gather(1, target[:, None]).sum())
                greedy[r] = greedy[r] and bool((lp.argmax(dim=-1) == target).all())
        for r, (key, _, _) in enumerate(requests):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, (logprob[r], greedy[r]))
        return list(zip(logprob, greedy, strict=True))

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """log p(text) of whole documents, in disjoint windows of ``block_size`` tokens, the first
        conditioned on the end-of-text token (lm-eval's rolling windows, as its HF model)."""
        results = []
        for request in tqdm(requests, disable=disable_tqdm, desc="slm loglikelihood_rolling"):
            (text,) = request.args
            windows = [(None, *lm_utils.make_disjoint_window(pair)) for pair in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            total = sum(logprob for logprob, _ in self._loglikelihood_tokens(windows, disable_tqdm=True))
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return results

    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding (sampling settings are ignored) until a stop string, the end-of-text token
        or ``max_gen_toks`` new tokens; the context keeps its last ``block_size`` tokens."""
        outputs = []
        vocab = self.model.config.vocab_size
        for request in tqdm(requests, disable=disable_tqdm, desc="slm generate_until"):
            context, kwargs = request.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ids = self.tok_encode(context) or [self._eot]  # an empty context: a new document
            new: list[int] = []
            text = ""
            for _ in range(int(kwargs.get("max_gen_toks", 256))):
                x = torch.tensor([(ids + new)[-self.max_length:]], device=self._device)
                hidden = self.model(x)[:, -1]
                token = int((hidden @ self.model.lm_head.weight[:vocab].T).argmax(dim=-1))
                if token == self._eot:
                    break
                new.append(token)
                text = self.tok_decode(new)
                if any(stop in text for stop in until):
                    break
            for stop in until:
                text = text.split(stop)[0]
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", (context, kwargs), text)
        return outputs


# ---- `slm eval ... tasks=...` ---------------------------------------------------------------------------

def task_list(tasks: Any) -> list[str]:
    """``tasks=a,b`` (a string), ``tasks=[a,b]`` or one name -> the names, in order, without repeats."""
    items = list(tasks) if isinstance(tasks, (list, tuple, ListConfig)) else str(tasks).split(",")
    names = list(dict.fromkeys(str(item).strip() for item in items if str(item).strip()))
    if not names:
        raise SlmError(f"tasks={tasks} names no task: use e.g. tasks=wikitext2_lastword,shakespeare_nextline")
    return names


def _not_custom_dataset_advice(record: logging.LogRecord) -> bool:
    """lm-eval warns on every task with a ``custom_dataset`` that kwargs can be passed: noise here."""
    return "Custom kwargs can be passed" not in record.getMessage()


@contextlib.contextmanager
def _offline(on: bool) -> Iterator[None]:
    """Hugging Face libraries offline while slm's local tasks run: they must not need the network."""
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    if on:
        os.environ.update(dict.fromkeys(saved, "1"))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _git_hash() -> str | None:
    """lm-eval's ``git_hash`` (the commit of the working directory's repo) without git's "fatal: not a
    git repository" on stderr when there is none."""
    import subprocess

    try:
        return subprocess.run(["git", "describe", "--always"], capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


@contextlib.contextmanager
def _quiet_git() -> Iterator[None]:
    import lm_eval.evaluator as evaluator

    if not hasattr(evaluator, "get_git_commit_hash"):  # another lm-eval layout: leave it alone
        yield
        return
    saved = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = _git_hash
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = saved


def _is_yaml(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and Path(name).expanduser().is_file()


def _task_manager(names: list[str]) -> tuple[Any, bool]:
    """lm-eval's TaskManager over slm's tasks (and the harness's own when a name needs them), and
    whether every task is one of slm's own (then nothing may use the network). A path to a task YAML
    is accepted too. Names are checked here so a typo fails in one line, before the model loads."""
    from lm_eval.tasks import TaskManager

    local_names = local_task_names()
    manager = TaskManager(include_path=str(tasks_dir()), include_defaults=False)
    if all(name in manager.all_tasks or _is_yaml(name) for name in names):
        return manager, all(name in manager.all_tasks for name in names)
    manager = TaskManager(include_path=str(tasks_dir()))  # indexes the harness's ~10^4 tasks: seconds
    for name in names:
        if name not in manager.all_tasks and not _is_yaml(name):
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise SlmError(f"unknown task {name!r}{hint}: use one of slm's local tasks ({', '.join(local_names)}, "
                           "or the tag slm_local for all), a task of lm-eval (e.g. hellaswag, arc_easy, "
                           "lambada_openai; `lm_eval ls tasks` lists them) or the path of a task YAML file")
    return manager, False


def results_path(cfg: DictConfig, ckpt: Path, names: list[str]) -> Path:
    """``out=`` if given; else ``<run dir>/eval/<tasks>.json`` for a checkpoint inside a run dir
    (``<tasks>@<checkpoint>.json`` for another checkpoint than last.ckpt)."""
    if cfg.get("out"):
        return Path(str(cfg.out)).expanduser()
    run = ckpt.parent.parent
    if ckpt.parent.name != "checkpoints" or not ((run / ".hydra").is_dir() or (run / "summary.json").is_file()):
        raise SlmError(f"checkpoint {ckpt} is not inside an slm run dir: pass out=<file>.json for the results")
    stem = "+".join(Path(name).stem if _is_yaml(name) else name for name in names)
    suffix = "" if ckpt.name == "last.ckpt" else f"@{ckpt.stem}"
    return run / "eval" / f"{stem}{suffix}.json"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def table(results: dict[str, Any]) -> str:
    """One line per (task, metric): value ± stderr and the number of examples scored."""
    rows = [("task", "metric", "value", "± stderr", "n")]
    for task, entry in results["results"].items():
        n = str(results.get("n-samples", {}).get(task, {}).get("effective", ""))
        first = True
        for key, value in entry.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr"):
                continue
            stderr = entry.get(f"{metric}_stderr,{filt}", "")
            stderr = _fmt(stderr) if isinstance(stderr, float) else ""
            label = metric if filt == "none" else f"{metric} ({filt})"
            rows.append((task if first else "", label, _fmt(value), stderr, n if first else ""))
            first = False
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    aligned = [[cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
               for row in rows]
    return "\n".join("  ".join(row).rstrip() for row in aligned)


def check_settings(cfg: DictConfig) -> None:
    """The harness's keys of conf/eval.yaml, before any work."""
    if not (is_int(cfg.batch_size) and cfg.batch_size > 0):
        raise SlmError(f"batch_size={cfg.batch_size} must be a positive integer: e.g. batch_size=16")
    if cfg.num_fewshot is not None and not (is_int(cfg.num_fewshot) and cfg.num_fewshot >= 0):
        raise SlmError(f"num_fewshot={cfg.num_fewshot} must be a non-negative integer or null: e.g. num_fewshot=5")
    if cfg.limit is not None and not ((is_int(cfg.limit) and cfg.limit > 0)
                                      or (is_number(cfg.limit) and 0 < cfg.limit <= 1)):
        raise SlmError(f"limit={cfg.limit} must be a number of examples, a share in (0, 1] or null: e.g. limit=100")
    if not (is_int(cfg.bootstrap_iters) and cfg.bootstrap_iters >= 0):
        raise SlmError(f"bootstrap_iters={cfg.bootstrap_iters} must be a non-negative integer: e.g. "
                       "bootstrap_iters=1000 (0: no standard errors)")


def evaluate_tasks(cfg: DictConfig) -> dict[str, Any]:
    """Run lm-eval on ``cfg.tasks`` with the checkpoint ``cfg.ckpt_path``; write and print the results."""
    check_settings(cfg)
    names = task_list(cfg.tasks)
    ckpt_file = checkpoint_file(cfg.ckpt_path)
    if not ckpt_file.exists():  # before the task index and the model: the cheap checks first
        raise SlmError(f"checkpoint {ckpt_file} does not exist: pass ckpt_path=<run dir or its checkpoints/last.ckpt>")
    out = results_path(cfg, ckpt_file, names)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its INFO lines would bury the table
    for handler in logging.getLogger().handlers + logging.getLogger("lm_eval").handlers:
        handler.addFilter(_not_custom_dataset_advice)  # a filter is added once, however often this runs
    manager, local = _task_manager(names)
    ckpt = load_checkpoint(ckpt_file)
    with _offline(local), _quiet_git():
        try:
            loaded = manager.load(names)["tasks"]
        except Exception as exc:
            if local:
                raise
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise SlmError(f"lm-eval could not load {', '.join(names)} ({type(exc).__name__}: {reason}): the "
                           "harness's tasks download their data from the Hugging Face hub, which needs the "
                           f"network (or its cache); slm's local tasks need none: {', '.join(local_task_names())}"
                           ) from exc
        model, tokenizer, eos_token = from_checkpoint(ckpt)
        lm = SlmLM(model=model, tokenizer=tokenizer, eos_token=eos_token, batch_size=cfg.batch_size,
                   device=cfg.get("device"))
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(loaded.values()), task_manager=manager, num_fewshot=cfg.num_fewshot,
            limit=cfg.limit, bootstrap_iters=cfg.bootstrap_iters, log_samples=False)
    results.pop("samples", None)
    record = {"slm": {"checkpoint": str(ckpt_file), "step": ckpt.get("global_step"), "tasks": names,
                      "num_fewshot": cfg.num_fewshot, "limit": cfg.limit, "lm_eval": lm_eval.__version__},
              **results}
    # The harness's results hold a few objects (task functions, numpy numbers): its own converter.
    record = json.loads(json.dumps(record, default=lm_utils.handle_non_serializable))
    write_json(out, record)
    print(table(record))
    print(f"results: {out}")
    return record
