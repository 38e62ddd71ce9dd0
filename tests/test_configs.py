"""Every shipped YAML agrees with the code it configures (litgpt's config test, for slm): each
selection, target and model file names its class with `_target_` and passes only arguments the
class's signature accepts; every experiment composes; conf/experiment/README.md lists them all."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# conf groups whose files instantiate a class of the code folder of the same name
GROUPS = {"selection": "slm_cli.selection", "target": "slm_cli.target", "model": "slm_cli.model"}
# keys the training loop reads itself rather than the class (slm_cli/run.py)
LOOP_KEYS = {"model": {"name"}}


def _files(group: str) -> list[Path]:
    return sorted((CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("path", [p for g in GROUPS for p in _files(g)], ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_yaml_matches_its_class(path: Path) -> None:
    group = path.parent.name
    assert (ROOT / GROUPS[group].replace(".", "/")).is_dir(), f"conf/{group} has no code folder of its name"
    cfg = OmegaConf.to_container(OmegaConf.load(path))
    target = cfg.pop("_target_", None)
    assert target and target.startswith(GROUPS[group] + "."), f"{path}: _target_ must name a class in {GROUPS[group]}"
    module, name = target.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    params = inspect.signature(cls).parameters
    unknown = set(cfg) - set(params) - LOOP_KEYS.get(group, set())
    assert not unknown, f"{path}: keys {sorted(unknown)} are not arguments of {target}"
    required = {k for k, p in params.items() if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    assert required <= set(cfg) | {"vocab_size"}, f"{path}: {target} needs {sorted(required - set(cfg))}"


def test_selection_and_target_yamls_instantiate() -> None:
    from hydra.utils import instantiate

    for group in ("selection", "target"):
        for path in _files(group):
            cfg = OmegaConf.load(path)
            if group == "selection" and cfg.get("reference", {}).get("mode") == "online":
                continue
            if group == "target" and "teacher" in cfg:  # loads a teacher model: tests/test_kd.py builds it
                continue
            obj = instantiate(cfg)
            assert obj.name == cfg.name


EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(name: str) -> None:
    with initialize_config_module(config_module="slm_cli.conf", version_base="1.3"):
        # conf/train.yaml lists `experiment: null`: the compose API takes experiment= (`slm train`
        # also reads +experiment=, tests/test_cli.py).
        cfg = compose("train", overrides=[f"experiment={name}"])
    assert cfg.task_name == name
    for group in GROUPS:
        assert cfg[group]._target_.startswith(GROUPS[group] + ".")


def test_experiment_readme_lists_every_experiment() -> None:
    text = (CONF / "experiment" / "README.md").read_text()
    missing = [name for name in EXPERIMENTS if f"`{name}`" not in text]
    assert not missing, f"conf/experiment/README.md does not list {missing}"
