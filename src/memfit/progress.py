"""Progress of long steps as plain lines (tokenizer training, evaluation, bench rows, training when piped).

memfit logs them to the `memfit` logger at INFO; the CLI prints them on stderr (`to_console`), so they show in
CI logs and pipes where a live progress bar shows nothing until the end. A library user sees them only after
configuring logging.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("memfit")


def note(message: str) -> None:
    """One progress line."""
    log.info(message)


def duration(seconds: float) -> str:
    """`42 s`, `3 min 5 s`, `1 h 2 min`."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


class Ticker:
    """Plain lines for a loop over `total` items: at most one per `every_s` seconds, and one at the end."""

    def __init__(self, what: str, total: int, every_s: float = 10.0, done: int = 0):
        self.what, self.total, self.every_s, self.first = what, total, every_s, done  # `done` before timing
        self.start = self.last = time.perf_counter()

    def update(self, done: int, detail: str = "") -> None:
        now = time.perf_counter()
        if done < self.total and now - self.last < self.every_s:
            return
        self.last = now
        elapsed = now - self.start
        rate = (done - self.first) / elapsed if elapsed > 0 else 0.0
        left = f", about {duration((self.total - done) / rate)} left" if rate > 0 and done < self.total else ""
        note(f"{self.what} {done}/{self.total}{' ' + detail if detail else ''} ({duration(elapsed)}{left})")


class _ConsoleHandler(logging.Handler):
    def __init__(self, console) -> None:
        super().__init__(logging.INFO)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.print(self.format(record), markup=False, highlight=False, soft_wrap=True)
        except Exception:  # a broken pipe must not stop a run
            self.handleError(record)


def to_console(console) -> None:
    """Print memfit's progress lines on `console` (a rich Console; the CLI passes its stderr console)."""
    if not any(isinstance(h, _ConsoleHandler) for h in log.handlers):
        log.addHandler(_ConsoleHandler(console))
    log.setLevel(logging.INFO)
