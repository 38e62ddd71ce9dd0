"""The corpora vendored with slm: the repo's `corpora/` folder, installed as the package `slm_cli.corpora`.

Configs name a vendored file independently of the working directory with the OmegaConf resolver
``${corpus:wikitext-2/valid.txt}``, which resolves to the file's absolute path inside the installed
package (editable or not). `register_resolvers()` registers it; `slm_cli.commands` calls it on import,
so every `slm` subcommand and every test that composes through `slm_cli.commands` has it.
Sources, sizes, sha256 and licences of the files are in `corpora/README.md`.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from omegaconf import OmegaConf

from slm_cli.errors import SlmError

PACKAGE = "slm_cli.corpora"
RESOLVER = "corpus"
SUFFIXES = (".txt",)  # corpus files; README.md / LICENSE beside them are not corpora


def _root() -> Path:
    root = files(PACKAGE)
    if not isinstance(root, Path):  # e.g. a zipped install: there is no file to hand to `datasets`
        raise SlmError(f"the package {PACKAGE} is not on the file system ({root}): install slm with pip")
    return root


def available() -> list[str]:
    """Names of the vendored corpus files, as ``<folder>/<file>`` relative to the package."""
    root = _root()
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.suffix in SUFFIXES)


def corpus_path(name: str) -> str:
    """Absolute path of the vendored corpus file ``name`` (e.g. ``wikitext-2/valid.txt``)."""
    names = available()
    name = str(name).strip().strip("/")
    if name not in names:
        raise SlmError(f"unknown corpus {name!r} in ${{{RESOLVER}:...}}: use one of {', '.join(names)}")
    return str((_root() / name).resolve())


def register_resolvers() -> None:
    """Register ``${corpus:NAME}`` with OmegaConf (idempotent)."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, corpus_path)
