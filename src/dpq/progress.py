"""Progress of long work, readable whether stderr is a terminal or a file.

On a terminal :func:`progress_bar` is a tqdm bar. Anywhere else (a pipe, a log file, CI)
carriage-return updates would pile up into one long line, so it prints one plain line at
every tenth of the work and one at the end instead, and only for work that takes a while
(nothing for a job done within :data:`QUIET_SECONDS`). ``enabled=False`` (``--quiet``)
prints nothing at all.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

LINE_STEPS = 10
"""Non-terminal progress prints a line at every 1/LINE_STEPS of the total."""
QUIET_SECONDS = 2.0
"""Non-terminal progress says nothing about work done within this many seconds."""


def is_terminal(stream: TextIO | None = None) -> bool:
    """True when ``stream`` (default stderr) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a real file
        return False


class _Silent:
    """The progress object of ``enabled=False``: accepts every call, prints nothing."""

    total: float | None = None
    n = 0

    def update(self, n: float = 1) -> None:
        self.n += n

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class LineProgress(_Silent):
    """Plain progress lines: ``desc: 30% (300/1,000 items, 12.0 s, 25.0 items/s)``."""

    def __init__(
        self,
        total: float | None,
        desc: str,
        unit: str,
        stream: TextIO,
        clock: Any = time.perf_counter,
    ) -> None:
        self.total, self.desc, self.unit, self.stream, self.clock = total, desc, unit, stream, clock
        self.n = 0
        self.postfix = ""
        self.started = clock()
        self._next_step = 1
        self._closed = False
        self._printed = False

    def _line(self) -> str:
        seconds = self.clock() - self.started
        rate = f", {self.n / seconds:,.1f} {self.unit}/s" if seconds > 0 and self.n else ""
        if self.total:
            share = (
                f"{100 * self.n / self.total:3.0f}% ({self.n:,.0f}/{self.total:,.0f} {self.unit}"
            )
        else:
            share = f"({self.n:,.0f} {self.unit}"
        extra = f"; {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {share}, {seconds:.1f} s{rate}){extra}"

    def update(self, n: float = 1) -> None:
        self.n += n
        if not self.total:
            return
        crossed = False
        while self._next_step <= LINE_STEPS and self.n >= self._next_step * self.total / LINE_STEPS:
            self._next_step += 1
            crossed = True
        if crossed and self.n < self.total:  # the last line is the one close() prints
            self._print()

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text

    def _print(self) -> None:
        if self._printed or self.clock() - self.started >= QUIET_SECONDS:
            self._printed = True
            print(self._line(), file=self.stream, flush=True)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._print()


def progress_bar(
    total: float | None,
    desc: str,
    unit: str = "it",
    enabled: bool = True,
    stream: TextIO | None = None,
    leave: bool = True,
    initial: float = 0,
) -> Any:
    """A progress reporter with tqdm's ``update`` / ``set_postfix_str`` / ``close`` calls.

    Args:
        total: the amount of work (None when unknown).
        desc: what is being done ("encode", "train").
        unit: what is counted ("img", "step").
        enabled: False gives a silent reporter (``--quiet``).
        stream: where it writes (default stderr).
        leave: keep a terminal bar on screen when done.
        initial: work already done (a resumed run).
    """
    stream = sys.stderr if stream is None else stream
    if not enabled:
        return _Silent()
    if is_terminal(stream):
        from tqdm.auto import tqdm

        return tqdm(
            total=total,
            desc=desc,
            unit=unit,
            file=stream,
            dynamic_ncols=True,
            leave=leave,
            initial=initial,
        )
    reporter = LineProgress(total, desc, unit, stream)
    reporter.n = 0
    reporter.update(initial)  # work done before (a resumed run) moves the first line on
    return reporter
