"""The evaluation tasks that ship with slm: the folder lm-eval indexes (`include_path`), their names,
and the loader their YAMLs name as ``custom_dataset``.

Each task is a folder ``slm_cli/evaluate/tasks/<name>/`` holding ``<name>.yaml`` and its data as
JSON lines. The data is read from the package itself, never from the network: a YAML says
``custom_dataset: !function slm_cli.evaluate.local_tasks.jsonl_dataset`` and lists its files under
``dataset_kwargs: data_files:``, relative to the YAML's own folder (``datasets.load_dataset("json")``
would resolve them against the working directory instead). This module needs neither lm-eval nor
torch; tasks/README.md says how to add a task.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Any

from slm_cli.errors import SlmError

PACKAGE = "slm_cli.evaluate"
FOLDER = "tasks"


def tasks_dir() -> Path:
    """The folder of slm's task YAMLs (inside the installed package, editable or not)."""
    root = files(PACKAGE)
    if not isinstance(root, Path):  # a zipped install: lm-eval needs real files to index
        raise SlmError(f"the package {PACKAGE} is not on the file system ({root}): install slm with pip")
    return root / FOLDER


def local_task_names() -> list[str]:
    """Names of the shipped tasks: one folder each, named after its task, holding ``<name>.yaml``."""
    return sorted(p.parent.name for p in tasks_dir().glob("*/*.yaml") if p.stem == p.parent.name)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise SlmError(f"task data {path} does not exist: rebuild it with python scripts/build_eval_tasks.py")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def jsonl_dataset(data_files: dict[str, str] | str, config_source: str | None = None, **_: Any) -> Any:
    """A ``datasets.DatasetDict`` of the JSON-lines files of a task: ``{split: file}``, or one file
    for the ``test`` split. lm-eval (>= 0.4.12) calls this with the task's ``dataset_kwargs`` and
    its metadata, whose ``config_source`` is the YAML's path; relative files resolve beside it.
    Other metadata (``version``...) is ignored."""
    import datasets

    base = Path(config_source).parent if config_source and config_source != "inline" else tasks_dir()
    splits = {"test": data_files} if isinstance(data_files, str) else dict(data_files)
    # Built in memory from the parsed rows: nothing is written to the datasets cache, nothing fetched.
    return datasets.DatasetDict({split: datasets.Dataset.from_list(_read_jsonl(base / name))
                                 for split, name in splits.items()})
