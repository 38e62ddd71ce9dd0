"""How `slm` reads a command's arguments before Hydra does: one table of rewrites per command.

Hydra's override grammar is strict where a command line is casual; each rewrite turns one casual
spelling into the override Hydra takes, and :func:`rewrite` is the only place they are applied
(by the dispatcher, slm_cli/__main__.py, and by the completion, slm_cli/completion.py):

- ``slm report a 'b/*'``: bare arguments are paths, gathered into ``runs=['a','b/*']``;
- ``slm train +experiment=NAME``: conf/train.yaml lists ``experiment: null`` (so that
  ``experiment=NAME`` works), and Hydra then refuses the documented ``+experiment=NAME``;
- ``slm eval tasks=a,b``: a comma list outside a sweep (no ``-m``) is the list ``tasks=[a,b]``,
  not a sweep that Hydra would refuse;
- ``slm tokens text=...``: the text is taken literally, although Hydra's grammar would read its
  parentheses, commas, quotes and ``${`` as syntax.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from functools import partial

# Hydra's flags that take a value (which is not a path); --info/-i takes one only from this set.
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun"}
_INFO_VALUES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
# `tasks=a,b`: a comma list with no brackets, quotes or nested `=`.
_COMMA_TASKS = re.compile(r"^tasks=([^\[\]'\"=]+,[^\[\]'\"=]*)$")


def _is_override(arg: str) -> bool:
    """`key=value` in Hydra's syntax (unless a path of that name exists)."""
    return bool(re.match(r"^(\+\+|\+|~)?[\w.@/-]+=", arg)) and not os.path.exists(arg)


def positional_to_override(args: list[str], key: str) -> list[str]:
    """``args`` with its bare arguments gathered into one ``key=[...]`` override, each quoted so
    that Hydra reads globs and odd characters literally (ValueError if ``key=`` is given too)."""
    bare: list[str] = []
    rest: list[str] = []
    for arg in args:
        previous = rest[-1] if rest else ""
        flag_value = previous in _FLAGS_WITH_VALUE or (previous in ("--info", "-i") and arg in _INFO_VALUES)
        if flag_value or arg.startswith("-") or _is_override(arg):
            rest.append(arg)
        else:
            bare.append(arg)
    if not bare:
        return args
    if any(re.match(rf"^(\+\+|\+)?{key}=", arg) for arg in rest):
        raise ValueError(f"pass paths either as arguments or as {key}=[...], not both")
    quoted = ",".join("'" + path.replace("'", "\\'") + "'" for path in bare)
    return [*rest, f"{key}=[{quoted}]"]


def plus_to_override(args: list[str], groups: tuple[str, ...]) -> list[str]:
    """``args`` with ``+group=...`` read as ``group=...`` for each of ``groups``."""
    plus = re.compile(rf"^\+(?=(?:{'|'.join(map(re.escape, groups))})=)")
    return [plus.sub("", arg) for arg in args]


def tasks_as_list(args: list[str]) -> list[str]:
    """``tasks=a,b`` as ``tasks=[a,b]``, unless the command is a sweep (``-m``)."""
    if "-m" in args or "--multirun" in args:
        return args
    return [f"tasks=[{m.group(1)}]" if (m := _COMMA_TASKS.match(arg)) else arg for arg in args]


def quote_text(args: list[str]) -> list[str]:
    """``text=...`` as one quoted string (unless already quoted), so that Hydra takes it literally."""
    out = []
    for arg in args:
        if arg.startswith("text=") and not re.fullmatch(r"text=(['\"]).*\1", arg, flags=re.DOTALL):
            value = arg[len("text="):]
            value = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)  # backslashes before a quote
            value = value.replace("'", "\\'").replace("${", "\\${")
            arg = f"text='{value}'"
        out.append(arg)
    return out


# command -> its rewrites, applied in order
REWRITES: dict[str, tuple[Callable[[list[str]], list[str]], ...]] = {
    "train": (partial(plus_to_override, groups=("experiment",)),),
    "report": (partial(positional_to_override, key="runs"),),
    "eval": (tasks_as_list,),
    "tokens": (quote_text,),
}


def rewrite(command: str, args: list[str]) -> list[str]:
    """A command's arguments as its Hydra app takes them (ValueError for a contradiction)."""
    for step in REWRITES.get(command, ()):
        args = step(args)
    return args
