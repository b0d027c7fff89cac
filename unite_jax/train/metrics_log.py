"""Where training numbers go: WORKDIR/metrics.jsonl, TensorBoard events, and the console line's fields.

Only process 0 writes. The workdir may be a local path or a bucket (gs://...):
files go through `etils.epath`; a bucket has no append, so metrics.jsonl is
rewritten whole at each flush there (it stays small: one line per logged step).
TensorBoard events are written locally and copied to a remote workdir on flush.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from typing import Any

from etils import epath

from unite_jax import files

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def console_fields(record: dict[str, Any]) -> dict[str, str]:
    """The numbers of a logged step shown on the console progress line: loss, acc, lr, ex/s, tok/s."""
    shown = (("loss", "loss", ".4f"), ("accuracy", "acc", ".3f"), ("learning_rate", "lr", ".3g"),
             ("examples_per_second", "ex/s", ".1f"), ("tokens_per_second", "tok/s", ".0f"))
    return {label: format(record[key], spec) for key, label, spec in shown if key in record}


class MetricsLog:
    """Appends JSON lines and TensorBoard scalars; `truncate_after(step)` drops lines of undone steps."""

    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = epath.Path(workdir) / METRICS_FILE
        self.remote = files.is_remote(workdir)
        self._lines: list[str] = []
        self._writer = None
        self._tb_local = None
        self._tb_remote = epath.Path(workdir) / TENSORBOARD_DIR
        if not enabled:
            return
        if self.remote and self.path.exists():
            self._lines = self.path.read_text().splitlines(keepends=True)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb_local = tempfile.mkdtemp(prefix="unite_jax_tb_") if self.remote else str(self._tb_remote)
            self._writer = SummaryWriter(self._tb_local, flush_secs=30)

    def truncate_after(self, step: int) -> None:
        """Keeps only records with record["step"] <= step (a resumed run redoes the later steps)."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines(keepends=True):
            try:
                if int(json.loads(line)["step"]) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line from a killed run
        self._lines = kept
        if self.remote:
            self.path.write_text("".join(kept))  # an object store replaces a whole object at once
        else:
            files.write_text(str(self.path), "".join(kept))

    def write(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in record.items() if k != "step"}}
        line = json.dumps(record, sort_keys=False) + "\n"
        if self.remote:
            self._lines.append(line)
        else:
            with open(self.path, "a") as f:
                f.write(line)
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(key, value, step)

    def flush(self) -> None:
        if not self.enabled:
            return
        if self.remote:
            self.path.write_text("".join(self._lines))
        if self._writer is not None:
            self._writer.flush()
            if self.remote:
                self._tb_remote.mkdir(parents=True, exist_ok=True)
                for name in os.listdir(self._tb_local):
                    (self._tb_remote / name).write_bytes(open(os.path.join(self._tb_local, name), "rb").read())

    def close(self) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _plain(value: Any) -> Any:
    """JSON-friendly scalars (numpy / jax scalars -> float or int)."""
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


class Throughput:
    """Examples/s and tokens/s between two log points."""

    def __init__(self):
        self.mark_time = time.time()
        self.examples = 0
        self.tokens = 0

    def add(self, examples: int, tokens: int) -> None:
        self.examples += examples
        self.tokens += tokens

    def read(self) -> dict[str, float]:
        now = time.time()
        elapsed = max(now - self.mark_time, 1e-9)
        rates = {"examples_per_second": self.examples / elapsed, "tokens_per_second": self.tokens / elapsed}
        self.mark_time, self.examples, self.tokens = now, 0, 0
        return rates
