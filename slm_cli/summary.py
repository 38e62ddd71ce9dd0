"""summary.json: the figures a finished run leaves, one key per figure.

`RunSummary` lists them, each with what it is and its unit (docs/outputs.md shows the same table;
tests/test_summary.py keeps the two equal). `slm train` writes it last and atomically, so its
presence means the run finished; `slm report` and `slm export` read it back with `read`, which is
also the one place that knows the earlier names of figures (`EARLIER_NAMES`).

A new figure is one field here (`number`, `text` or `mapping`, with its doc and unit), one
argument of `from_run` if the run computes it, and one row in docs/outputs.md. The realised
accounting leads (what the code executed), the papers' nominal accounting beside it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from slm_cli.outputs import write_json

FILE = "summary.json"

# Earlier key -> today's key, for run dirs written before the FLOPs figures were renamed.
EARLIER_NAMES = {"flops_total": "flops_realized", "flops_clm_equivalent": "flops_clm",
                 "flops_saved_frac": "flops_saved_frac_nominal"}


def number(doc: str, unit: str) -> Any:
    """A numeric figure (int or float in the JSON)."""
    return field(default=None, metadata={"doc": doc, "unit": unit, "kind": "number"})


def text(doc: str) -> Any:
    return field(default=None, metadata={"doc": doc, "unit": "", "kind": "text"})


def mapping(doc: str, unit: str) -> Any:
    """A figure per name ({name: number})."""
    return field(default=None, metadata={"doc": doc, "unit": unit, "kind": "mapping"})


@dataclass(frozen=True, kw_only=True)
class RunSummary:
    """What a finished run reports; None where a summary read back lacks the figure."""

    steps: int | None = number("optimizer steps completed", "steps")
    train_tokens: int | None = number("tokens drawn from the corpus by training", "tokens")
    forward_tokens: int | None = number(
        "tokens run through the full forward and backward: fewer than drawn only with instance-level selection",
        "tokens")
    selected_tokens: int | None = number("tokens trained on (the loss was back-propagated through them)", "tokens")
    val_loss: float | None = number("final validation loss over all tokens of the validation windows", "nats per token")
    val_ppl: float | None = number("exp(val_loss)", "")
    val_sources: dict[str, float] | None = mapping(
        "with data=mix, the final validation loss over each source's windows; {} for one corpus", "nats per token")
    flops_realized: float | None = number(
        "training FLOPs the code executed, by the analytic model of docs/flops.md (logged as flops/realized)", "FLOPs")
    flops_saved_frac_realized: float | None = number("1 − flops_realized / flops_clm", "fraction")
    flops_nominal: float | None = number(
        "training FLOPs in the papers' accounting: the backward pass of the selected tokens only "
        "(logged as flops/nominal)", "FLOPs")
    flops_saved_frac_nominal: float | None = number("1 − flops_nominal / flops_clm, the papers' accounting", "fraction")
    flops_clm: float | None = number("the FLOPs of CLM steps on the same tokens", "FLOPs")
    flops_reference_scoring: float | None = number(
        "RHO-1's offline reference scoring (slm score), spent once over the whole corpus; 0 otherwise", "FLOPs")
    flops_saved_frac_nominal_incl_scoring: float | None = number(
        "1 − (flops_nominal + flops_reference_scoring) / flops_clm: the scoring charged to this run, so "
        "that RHO-1 compares with ESLM on one basis", "fraction")
    train_tokens_per_s: float | None = number("tokens per second inside training steps, this process only",
                                              "tokens/s")
    wall_s: float | None = number("wall time of the command", "s")
    selection: str | None = text("the selection strategy's name")
    target: str | None = text("the training target's name")
    model: str | None = text("the model's name (conf/model/)")
    params: int | None = number("the model's parameters (position embeddings excluded)", "parameters")
    data: str | None = text("the prepared corpus folder")
    checkpoint: str | None = text("the final checkpoint (checkpoints/last.ckpt)")

    @classmethod
    def from_run(cls, counters: Mapping[str, float], scoring_flops: float, **figures: Any) -> RunSummary:
        """The summary of a run from its counters (train_tokens, forward_tokens, selected_tokens,
        flops_realized, flops_nominal, flops_clm: slm_cli/accounting.py's, summed over ranks),
        RHO-1's offline scoring FLOPs, and every other figure by name."""
        from slm_cli.flops import saved_frac

        clm = counters["flops_clm"]
        return cls(
            train_tokens=int(counters["train_tokens"]), forward_tokens=int(counters["forward_tokens"]),
            selected_tokens=int(counters["selected_tokens"]),
            flops_realized=counters["flops_realized"], flops_nominal=counters["flops_nominal"], flops_clm=clm,
            flops_saved_frac_realized=saved_frac(counters["flops_realized"], clm),
            flops_saved_frac_nominal=saved_frac(counters["flops_nominal"], clm),
            flops_reference_scoring=scoring_flops,
            flops_saved_frac_nominal_incl_scoring=saved_frac(counters["flops_nominal"] + scoring_flops, clm),
            **figures)

    def to_dict(self) -> dict[str, Any]:
        """summary.json's object: every figure under its one key, in the order of the fields."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def write(self, run_dir: str | os.PathLike) -> Path:
        return write_json(Path(run_dir) / FILE, self.to_dict())

    def numbers(self) -> dict[str, float]:
        """The numeric figures the summary has, by key."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.metadata["kind"] == "number" and getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSummary:
        """A summary.json object under today's keys. An earlier key stands in where today's is
        absent; figures that follow from others are derived where missing (the FLOPs from a saved
        fraction and the reverse, the perplexity); a value of the wrong type, or an unknown key,
        is left out."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            keys = [f.name, *(old for old, new in EARLIER_NAMES.items() if new == f.name)]
            found = (_typed(data.get(key), f.metadata["kind"]) for key in keys)
            values[f.name] = next((v for v in found if v is not None), None)
        return cls(**_derived(values))


def _typed(value: Any, kind: str) -> Any:
    """``value`` if it has the kind's JSON type, else None."""
    if kind == "number":
        return value if isinstance(value, int | float) and not isinstance(value, bool) else None
    if kind == "text":
        return value if isinstance(value, str) else None
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if _typed(v, "number") is not None}
    return None


def _derived(values: dict[str, Any]) -> dict[str, Any]:
    """Figures an older or hand-written summary lacks, from those it has. (flops and loss import
    torch: only when a figure is missing, so that reading a summary stays light.)"""
    if values["forward_tokens"] is None:  # runs before instance-level selection ran every token drawn
        values["forward_tokens"] = values["train_tokens"]
    clm = values["flops_clm"]
    for accounting in ("realized", "nominal"):
        flops, frac = f"flops_{accounting}", f"flops_saved_frac_{accounting}"
        if values[flops] is None and clm is not None and values[frac] is not None:
            values[flops] = clm * (1.0 - values[frac])
        if values[frac] is None and clm and values[flops] is not None:
            from slm_cli.flops import saved_frac

            values[frac] = saved_frac(values[flops], clm)
    if values["val_ppl"] is None and values["val_loss"] is not None:
        from slm_cli.loss import perplexity

        values["val_ppl"] = perplexity(values["val_loss"])
    return values


def read(path: str | os.PathLike) -> RunSummary:
    """A summary.json (or the run dir holding one); OSError or ValueError if it cannot be read."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return RunSummary.from_dict(data)
