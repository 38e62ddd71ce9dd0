"""`slm tokens ckpt_path=... text="..." | file=... | split=val window=K`: one HTML page colouring each
token by its loss, entropy, reference loss or excess loss, with the strategy's selection marked."""

from __future__ import annotations

import re
import sys

import hydra
from omegaconf import DictConfig

from slm_cli.commands import CONFIG_PATH, VERSION_BASE
from slm_cli.errors import report_errors


def quote_text(argv: list[str]) -> list[str]:
    """`text=...` taken literally: Hydra's grammar would read parentheses, commas, quotes and `${`
    in a text as syntax, so the value is passed to it as one quoted string (unless already quoted)."""
    out = []
    for arg in argv:
        if arg.startswith("text=") and not re.fullmatch(r"text=(['\"]).*\1", arg, flags=re.DOTALL):
            value = arg[len("text="):]
            value = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)  # backslashes before a quote
            value = value.replace("'", "\\'").replace("${", "\\${")
            arg = f"text='{value}'"
        out.append(arg)
    return out


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="tokens")
@report_errors
def _main(cfg: DictConfig) -> str:
    from slm_cli.report.tokens import tokens

    return str(tokens(cfg))


def main() -> None:
    sys.argv = quote_text(sys.argv)
    _main()
