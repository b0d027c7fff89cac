"""A dependency-free progress line for long encodes (items/s and ETA on stderr)."""

from __future__ import annotations

import math
import sys
import time


class Progress:
    """Progress of `total` items; `update(n)` after each piece of work.

    On a terminal the line is redrawn in place; otherwise (a log file, a CI job) a full line is
    printed at most every `every_s` seconds and at the end, so logs stay readable.
    `skipped(n)` counts items done earlier (a resumed run) without letting them inflate items/s.
    """

    def __init__(self, total: int, label: str = "encode", *, enabled: bool = True, stream=None,
                 every_s: float = 10.0):
        self.total, self.label, self.enabled = total, label, enabled
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self.done = self.fresh = 0
        self.start = time.perf_counter()
        self._last_print = -float("inf")
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def skipped(self, count: int) -> None:
        self.done += count
        self._draw()

    def update(self, count: int) -> None:
        self.done += count
        self.fresh += count
        self._draw()

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.fresh / elapsed if elapsed > 0 else 0.0
        remaining = (self.total - self.done) / rate if rate > 0 else float("nan")
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        return (f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"{rate:.1f} items/s ETA {_clock(remaining)} elapsed {_clock(elapsed)}")

    def _draw(self) -> None:
        if not self.enabled:
            return
        finished = self.done >= self.total
        if self._tty:
            self.stream.write("\r" + self.line() + ("\n" if finished else ""))
        elif finished or time.perf_counter() - self._last_print >= self.every_s:
            self.stream.write(self.line() + "\n")
            self._last_print = time.perf_counter()
        self.stream.flush()


def _clock(seconds: float) -> str:
    if math.isnan(seconds):  # no rate yet
        return "--:--"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


def log(message: str) -> None:
    """One message line on stderr (stdout is kept for machine-readable output)."""
    print(message, file=sys.stderr, flush=True)
