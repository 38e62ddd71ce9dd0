"""Commands given a run follow it: `slm eval`, `slm tokens` and `slm dynamics` take the run's own data
(the same prepared folder under the run's ``paths.data_dir``: nothing is tokenised again) and
selection settings, unless the command line sets them.

A run's settings are its training config: the ``config`` a checkpoint carries (resolved when the run
started), or else the run dir's ``.hydra/config.yaml``. A Hugging Face folder carries none, so a
command keeps its own defaults. The command line wins setting by setting: ``data=NAME`` (a group)
replaces the run's data; ``data.batch_size=8`` (a key inside it) keeps the run's data with that one
value changed. The settings taken from the run are named in the command's first printed line.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from slm_cli.data.corpora import register_resolvers
from slm_cli.outputs import RUN_DIR_CHECKPOINT

HYDRA_CONFIG = Path(".hydra") / "config.yaml"  # where Hydra saves a run's config in its run dir
_KEY = re.compile(r"^(?:~|\+\+|\+)?([\w.-]+)")


def run_dir(spec: str | Path) -> Path:
    """The run dir a model argument belongs to: the dir itself, or the run of ``<run>/checkpoints/x.ckpt``."""
    path = Path(spec).expanduser()
    if path.is_dir() and (path / RUN_DIR_CHECKPOINT).exists():
        return path
    return path.parent.parent if path.parent.name == RUN_DIR_CHECKPOINT.parent.name else path


def run_config(spec: str | Path, entry: dict[str, Any]) -> dict[str, Any]:
    """The training config of the run ``spec`` (a checkpoint's ``slm`` entry ``entry``), {} if none:
    the checkpoint's own, or else the run dir's .hydra/config.yaml with these keys resolved."""
    if entry.get("config"):
        return entry["config"]
    saved = run_dir(spec) / HYDRA_CONFIG
    if not saved.is_file():
        return {}
    register_resolvers()  # ${corpus:NAME} in data.path
    config = OmegaConf.load(saved)
    # Only the settings a command follows: others (the run's output dir) resolve only inside that run.
    found = {key: OmegaConf.to_container(config[key], resolve=True) for key in ("data", "selection")
             if isinstance(config.get(key), DictConfig)}
    data_dir = OmegaConf.select(config, "paths.data_dir")
    return found | ({"paths": {"data_dir": data_dir}} if data_dir is not None else {})


def command_line_keys() -> list[str]:
    """The keys the command line set (``data``, ``data.path``, ``paths.data_dir``...), from Hydra's
    task overrides; [] outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    keys = [_KEY.match(str(override)) for override in HydraConfig.get().overrides.task]
    return [m.group(1) for m in keys if m]


def follow(cfg: DictConfig, run: dict[str, Any], keys: tuple[str, ...]) -> tuple[DictConfig, list[str]]:
    """``cfg`` with each of ``keys`` (a group such as ``data`` or a key such as ``paths.data_dir``) set
    to the run's, unless the command line set it or a group holding it; keys the command line set
    inside a followed group keep their values. Returns the new config and the keys taken from the run."""
    cfg = copy.deepcopy(cfg)
    given = command_line_keys()
    taken = []
    for key in keys:
        value = OmegaConf.select(OmegaConf.create(run), key) if run else None
        if value is None or any(key == g or key.startswith(g + ".") for g in given):
            continue
        inner = {g: OmegaConf.select(cfg, g) for g in given if g.startswith(key + ".")}
        with open_dict(cfg):
            OmegaConf.update(cfg, key, value, merge=False)
            for g, v in inner.items():
                OmegaConf.update(cfg, g, v, merge=False)
        taken.append(key)
    return cfg, taken


def describe_data(cfg: DictConfig) -> str:
    """``cfg.data`` in a few words: its source, path or hub name and ``paths.data_dir``."""
    data = cfg.data
    words = [f"source={data.source}"]
    if data.get("name"):
        words.insert(0, f"name={data.name}")
    where = {"files": "path", "hub": "hub_name"}.get(str(data.source))
    if where and data.get(where):
        words.append(f"{where}={data[where]}")
    if data.source == "mix":
        words.append(f"sources={','.join(data.get('sources') or {})}")
    return " ".join([*words, f"data_dir={cfg.paths.data_dir}"])


def describe_selection(selection: DictConfig) -> str:
    """``selection`` in a few words: its name and its settings."""
    settings = [f"{k}={v}" for k, v in selection.items() if k not in ("_target_", "name", "scope")]
    return " ".join([f"{selection.name}", *settings])


def whose(key: str, taken: list[str], spec: str) -> str:
    """``<spec>'s `` when ``key`` came from the run ``spec``, else ``""``."""
    return f"{spec}'s " if key in taken else ""
