"""Progress of a loop, written for where it is read: a tqdm bar on a terminal, plain lines in a log.

A bar redraws one line with carriage returns, which a log file (a SLURM job's, `slm ... > log`)
keeps as one unreadable line per bar. So when the stream is not a terminal, progress is a plain
line every `SLM_PROGRESS_EVERY` seconds (30 by default) and one at the end, when the loop closes:

    train  step 120/300  40%  train/loss 5.318  2,410 tokens/s  elapsed 50 s  eta 75 s

Any loop uses the same two calls::

    with Progress(total, "eval val", "batch") as p:      # or: for b in track(batches, "scoring", "batch")
        p.update(1, tokens=n_tokens, loss=loss)

A library's own loop (lm-eval, `datasets`) runs inside `with quiet_bars():`, which silences its
tqdm bars unless they go to a terminal.

`SLM_PROGRESS` picks the display: `auto` (a bar on a terminal, else lines), `bar`, `lines` or `off`.
Training's Lightning callback (slm_cli/trainer.py) draws through this module too.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any, TypeVar

from slm_cli.errors import SlmError
from slm_cli.text import duration

MODE_VAR = "SLM_PROGRESS"
EVERY_VAR = "SLM_PROGRESS_EVERY"
MODES = ("auto", "bar", "lines", "off")
EVERY_S = 30.0  # often enough to see a job is alive, rare enough that a day's log stays short

T = TypeVar("T")


def display_mode(stream: IO[str]) -> str:
    """`bar`, `lines` or `off`: `SLM_PROGRESS`, or with `auto` (the default) whether `stream` is a terminal."""
    mode = os.environ.get(MODE_VAR, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise SlmError(f"{MODE_VAR}={os.environ[MODE_VAR]} is not a progress display: set it to one of "
                       f"{', '.join(MODES)} (auto: a bar on a terminal, plain lines otherwise)")
    if mode != "auto":
        return mode
    isatty = getattr(stream, "isatty", None)
    return "bar" if callable(isatty) and isatty() else "lines"


def line_interval() -> float:
    """Seconds between two progress lines: `SLM_PROGRESS_EVERY`, else 30 (0: a line per update)."""
    text = os.environ.get(EVERY_VAR, "").strip()
    if not text:
        return EVERY_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also refuses nan
        raise SlmError(f"{EVERY_VAR}={text} is not a number of seconds: set e.g. {EVERY_VAR}=30 (0: every update)")
    return seconds


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"


def fields_text(fields: dict[str, Any]) -> str:
    """`name value` pairs, two spaces apart, numbers to four significant digits."""
    return "  ".join(f"{name} {_number(value)}" for name, value in fields.items())


def rate_text(done: float, tokens: int, unit: str, elapsed: float) -> str:
    """Tokens per second when the loop counts tokens, else its units per second."""
    if elapsed <= 0:
        return ""
    if tokens:
        return f"{tokens / elapsed:,.0f} tokens/s"
    per_s = done / elapsed
    return f"{per_s:.3g} {unit}/s" if per_s >= 1 or per_s == 0 else f"{1 / per_s:.3g} s/{unit}"


def line(desc: str, unit: str, n: int, total: int | None, *, done: int, tokens: int, elapsed: float,
         fields: dict[str, Any], final: bool = False) -> str:
    """One progress line: where the loop is, its fields, its rate, the time spent and left.

    `done` counts the units of this run (a resumed loop starts at `n - done`): the rate and the ETA
    come from them, averaged since the start, so that a slow first step or a validation in between
    is paid back over the run instead of swinging the estimate."""
    parts = [desc, f"{unit} {n:,}/{total:,}" if total else f"{unit} {n:,}"]
    if total:
        parts.append(f"{100 * n / total:.0f}%")
    parts += [fields_text(fields), rate_text(done, tokens, unit, elapsed), f"elapsed {duration(elapsed)}"]
    if final:
        parts.append("done" if total is None or n >= total else "stopped")
    elif total and done and elapsed > 0:
        parts.append(f"eta {duration((total - n) * elapsed / done)}")
    return "  ".join(part for part in parts if part)


class Progress:
    """A loop's progress: `update` after each unit of work, `close` (or the `with` block) at the end.

    `total`: the units the loop will reach (None: unknown); `initial`: where a resumed loop starts;
    `leave`: keep the bar once closed (an inner loop's, e.g. validation, is cleared); `disable`: show
    nothing (e.g. on ranks other than 0); `stream`: where to write, stderr by default.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it", *, initial: int = 0, leave: bool = True,
                 disable: bool = False, stream: IO[str] | None = None) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n, self.done, self.tokens = initial, 0, 0
        self.fields: dict[str, Any] = {}
        self.stream = stream or sys.stderr
        self.mode = "off" if disable else display_mode(self.stream)
        self.every = line_interval()
        self.start = time.perf_counter()
        self._last_line = self.start
        self._unwritten = False  # an update since the last line
        self._bar: Any = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave, file=self.stream,
                             dynamic_ncols=True)

    def update(self, n: int = 1, *, tokens: int = 0, **fields: Any) -> None:
        """`n` more units done (`tokens` more tokens among them); `fields` (e.g. loss=...) shown from now on."""
        self.n += n
        self.done += n
        self.tokens += tokens
        self.fields.update(fields)
        self._unwritten = True
        if self.mode == "bar":
            self._bar.set_postfix_str(self._postfix(), refresh=False)
            self._bar.update(n)
        elif self.mode == "lines":
            now = time.perf_counter()
            if now - self._last_line >= self.every:
                self._write(final=self.total is not None and self.n >= self.total, now=now)

    def set(self, **fields: Any) -> None:
        """Show these fields from now on, without advancing (e.g. a validation's loss once it is known)."""
        self.fields.update(fields)
        self._unwritten = True
        if self.mode == "bar":
            self._bar.set_postfix_str(self._postfix())

    def close(self) -> None:
        """The last line (lines: unless the last update wrote it already), or the bar's last state."""
        if self.mode == "bar":
            self._bar.close()
        elif self.mode == "lines" and self._unwritten:
            self._write(final=True, now=time.perf_counter())
        self.mode = "off"

    def _postfix(self) -> str:
        return "  ".join(p for p in (fields_text(self.fields),
                                    rate_text(self.done, self.tokens, self.unit, time.perf_counter() - self.start)
                                    if self.tokens else "") if p)

    def _write(self, *, final: bool, now: float) -> None:
        text = line(self.desc, self.unit, self.n, self.total, done=self.done, tokens=self.tokens,
                    elapsed=now - self.start, fields=self.fields, final=final)
        self.stream.write(text + "\n")
        self.stream.flush()
        self._last_line, self._unwritten = now, False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(items: Iterable[T], desc: str, unit: str = "it", *, total: int | None = None,
          disable: bool = False) -> Iterator[T]:
    """`items`, with a Progress advancing by one per item: a drop-in for `tqdm(items, desc=..., unit=...)`."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(total, desc, unit, disable=disable) as p:
        for item in items:
            yield item
            p.update(1)


@contextlib.contextmanager
def quiet_bars(stream: IO[str] | None = None) -> Iterator[None]:
    """Inside, every tqdm bar that a library opens (lm-eval's requests, `datasets`' maps) is disabled,
    unless progress on `stream` (stderr by default) is shown as bars, on a terminal.

    For loops slm does not own: in a log their bars would be lines of carriage returns, and slm
    writes its own lines for the work that takes time. tqdm reads its `disable` argument when a bar
    is made, and libraries pass it explicitly, so the constructor is wrapped (subclasses such as
    tqdm.auto's and `datasets`' call it too), and restored on exit."""
    from tqdm import std

    if display_mode(stream or sys.stderr) == "bar":
        yield
        return
    original = std.tqdm.__init__

    def disabled(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    std.tqdm.__init__ = disabled  # type: ignore[method-assign]
    try:
        yield
    finally:
        std.tqdm.__init__ = original  # type: ignore[method-assign]
