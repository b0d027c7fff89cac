"""Progress lines for long work (encoding, evaluation, training): rate, ETA and whatever else counts.

One printer for every loop: on a terminal the line is redrawn in place; in a log file or a CI job a
full line is printed at most every `every_s` seconds and at the end, so logs stay readable (a
carriage return never reaches a file). `log` and `console` print one plain line. A leaf module:
nothing from the package, nothing heavy.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO


class Progress:
    """Progress of `total` units of work (`unit`: "items", "steps"); `update(n, **fields)` after each piece.

    `done` (at the start) and `skipped(n)` count units done earlier (a resumed run) without letting them
    inflate the rate.
    fields: extra `name value` pairs shown after the ETA (a training step's loss, learning rate, ...).
    redraw: rewrite the line in place (default: when the stream is a terminal). every_s: without
    redraw, the shortest time between two printed lines (0: a line per update).
    """

    def __init__(self, total: int, label: str = "encode", *, unit: str = "items", done: int = 0,
                 enabled: bool = True, stream: TextIO | None = None, every_s: float = 10.0,
                 redraw: bool | None = None):
        self.total, self.label, self.unit, self.enabled = total, label, unit, enabled
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self.done, self.fresh = done, 0
        self.start = time.perf_counter()
        self.fields: dict[str, Any] = {}
        self._last_print = -float("inf")
        self._redraw = bool(getattr(self.stream, "isatty", lambda: False)()) if redraw is None else redraw

    def skipped(self, count: int) -> None:
        self.done += count
        self._draw()

    def update(self, count: int, **fields: Any) -> None:
        self.done += count
        self.fresh += count
        self.fields = fields
        self._draw()

    def eta_seconds(self) -> float:
        """Seconds left at the rate of the work done so far in this run (nan before any)."""
        rate = self.rate()
        return (self.total - self.done) / rate if rate > 0 else float("nan")

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.fresh / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        elapsed = time.perf_counter() - self.start
        extra = "".join(f" {name} {value}" for name, value in self.fields.items())
        return (f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"{self.rate():.1f} {self.unit}/s ETA {format_duration(self.eta_seconds())} "
                f"elapsed {format_duration(elapsed)}{extra}")

    def _draw(self) -> None:
        if not self.enabled:
            return
        finished = self.done >= self.total
        if self._redraw:
            self.stream.write("\r" + self.line() + ("\n" if finished else ""))
        elif finished or time.perf_counter() - self._last_print >= self.every_s:
            self.stream.write(self.line() + "\n")
            self._last_print = time.perf_counter()
        self.stream.flush()


def format_duration(seconds: float) -> str:
    """`h:mm:ss`, or `mm:ss` under an hour; `--:--` when unknown (no rate yet)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "--:--"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


def log(message: str) -> None:
    """One message line on stderr (stdout is kept for machine-readable output)."""
    print(message, file=sys.stderr, flush=True)


def console(message: str) -> None:
    """One message line on stdout (the trainer's own output)."""
    print(message, file=sys.stdout, flush=True)
