"""Shell completion for `slm`: the bash script, the command word, and the line Hydra completes.

Hydra's own script completes one Hydra app: it runs ``<program> -sc query=bash`` with the line in
``COMP_LINE`` and registers itself for the program's name, which for `slm` is no Hydra app but a
dispatcher in front of several. So `slm` ships its own script: it asks ``slm -sc query=bash`` the
same way; the first word completes to a command here, and the rest of the line goes to Hydra's
completion of that command's config (groups, options, keys, values and files).
"""

from __future__ import annotations

import contextlib
import os

from slm_cli.arguments import rewrite

FLAGS = ("-sc", "--shell-completion")  # Hydra's spelling
PROGRAM = "slm"  # the console script the completion is registered for

INSTALL = r"""# bash completion for slm: eval "$(slm -sc install=bash)" (in ~/.bashrc to keep it)
_slm_completion()
{
    local line=${COMP_LINE:0:COMP_POINT}
    local word=${line##*[[:space:]]}      # the word being completed, '=' and ':' included
    local breaks=${COMP_WORDBREAKS-=:}
    local tail=${word##*[$breaks]}        # the part readline replaces: after the last '=' or ':'
    local program=${COMP_WORDS[0]}
    [[ $program == "~/"* ]] && program=$HOME/${program:2}
    local -a choices
    read -r -a choices <<< "$(COMP_LINE=$line COMP_POINT=${#line} "$program" -sc query=bash 2>/dev/null)"
    # slm answers whole words (selection=eslm); bash replaces only the part after the break.
    local head=${word%"$tail"} choice
    COMPREPLY=()
    for choice in "${choices[@]}"; do
        [[ $choice == "$word"* ]] && COMPREPLY+=("${choice#"$head"}")
    done
    # A finished word gets its space; a key, group or folder (`selection=`, `model.`, `conf/`) does not.
    if [[ ${#COMPREPLY[@]} -eq 1 && ${COMPREPLY[0]} == [./]* && -d ${COMPREPLY[0]} ]]; then
        COMPREPLY[0]+=/                   # Hydra completes paths (data.path=./...) without the slash
    elif [[ ${#COMPREPLY[@]} -eq 1 && ${COMPREPLY[0]} != *[=./] ]] && type compopt &>/dev/null; then
        compopt +o nospace
    fi
}
complete -o nospace -o default -F _slm_completion {program}"""

UNINSTALL = "complete -r {program} 2>/dev/null; unset -f _slm_completion"


def requested(argv: list[str]) -> str | None:
    """The value of ``-sc``/``--shell-completion`` anywhere in ``argv`` (``install=bash``), or None."""
    for i, arg in enumerate(argv):
        if arg in FLAGS:
            return argv[i + 1] if i + 1 < len(argv) else ""
        if arg.startswith("--shell-completion="):
            return arg.split("=", 1)[1]
    return None


def script(request: str) -> str | None:
    """The script for ``install=bash`` / ``uninstall=bash``; None for ``query=bash``."""
    action, _, shell = request.partition("=")
    if action not in ("install", "uninstall", "query"):
        raise ValueError(f"-sc {request} is unknown: use -sc install=bash (or uninstall=bash)")
    if shell != "bash":
        raise ValueError(f"-sc {request}: slm completes in bash only: use -sc {action}=bash")
    if action == "query":
        return None
    return (INSTALL if action == "install" else UNINSTALL).replace("{program}", PROGRAM)


def split_line(line: str, point: str | None) -> tuple[list[str], str]:
    """``COMP_LINE`` up to the cursor (``COMP_POINT``) → the finished words after the program and
    the word being completed ("" after a space)."""
    if point is not None and point.isdigit():
        line = line[: int(point)]
    words = line.split()[1:]
    if not line or line[-1].isspace():
        return words, ""
    return (words[:-1], words[-1]) if words else ([], "")


def respond(request: str, commands: list[str]) -> list[str]:
    """Answer ``slm ... -sc REQUEST``: print a script or the matching commands and return [], or
    return the arguments that run Hydra's query for the command on the line (set in ``COMP_LINE``).

    The finished words are rewritten as the dispatcher rewrites them (slm_cli/arguments.py), so that
    Hydra composes them the way `slm` would run them."""
    text = script(request)
    if text is not None:
        print(text)
        return []
    if "COMP_LINE" not in os.environ:
        raise ValueError("-sc query=bash reads the line from COMP_LINE, which is not set: "
                         f"install the completion with eval \"$({PROGRAM} -sc install=bash)\"")
    words, partial = split_line(os.environ["COMP_LINE"], os.environ.get("COMP_POINT"))
    if not words:  # the command itself
        print(" ".join(name for name in commands if name.startswith(partial)))
        return []
    command, args = words[0], words[1:]
    if command not in commands:
        return []
    with contextlib.suppress(ValueError):  # e.g. paths given both ways: complete the words as they are
        args = rewrite(command, args)
    # Hydra's query drops the line's first word (the program) and completes after its last space.
    os.environ["COMP_LINE"] = " ".join([PROGRAM, *args, partial])
    os.environ.pop("COMP_POINT", None)
    return [command, "-sc", "query=bash"]
