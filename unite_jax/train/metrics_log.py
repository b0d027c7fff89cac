"""Where training numbers go: a console progress line, WORKDIR/metrics.jsonl, TensorBoard events.

Only process 0 writes. The workdir may be a local path or a bucket (gs://...):
files go through `etils.epath`; a bucket has no append, so metrics.jsonl is
rewritten whole at each flush there (it stays small: one line per logged step).
TensorBoard events are written locally and copied to a remote workdir on flush.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from typing import Any

from etils import epath

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def is_remote(path: str) -> bool:
    return "://" in str(path)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def progress_line(stage: str, step: int, total: int, record: dict[str, Any], eta_seconds: float) -> str:
    """`stage1 step 120/1000 loss 2.3141 lr 9.8e-05 ex/s 512.0 tok/s 40960 ETA 12:01`."""
    parts = [f"{stage} step {step}/{total}"]
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4f}")
    if "accuracy" in record:
        parts.append(f"acc {record['accuracy']:.3f}")
    if "learning_rate" in record:
        parts.append(f"lr {record['learning_rate']:.3g}")
    if "examples_per_second" in record:
        parts.append(f"ex/s {record['examples_per_second']:.1f}")
    if "tokens_per_second" in record:
        parts.append(f"tok/s {record['tokens_per_second']:.0f}")
    parts.append(f"ETA {format_duration(eta_seconds)}")
    return " ".join(parts)


class MetricsLog:
    """Appends JSON lines and TensorBoard scalars; `truncate_after(step)` drops lines of undone steps."""

    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = epath.Path(workdir) / METRICS_FILE
        self.remote = is_remote(workdir)
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
        tmp = self.path.parent / (self.path.name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(self.path)

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


def console(message: str) -> None:
    print(message, file=sys.stdout, flush=True)


class Throughput:
    """Examples/s and tokens/s between two log points, and the ETA from the average step time."""

    def __init__(self, start_step: int):
        self.start_step = start_step
        self.start_time = time.time()
        self.mark_time = self.start_time
        self.examples = 0
        self.tokens = 0

    def add(self, examples: int, tokens: int) -> None:
        self.examples += examples
        self.tokens += tokens

    def read(self, step: int, total_steps: int) -> dict[str, float]:
        now = time.time()
        elapsed = max(now - self.mark_time, 1e-9)
        rates = {"examples_per_second": self.examples / elapsed, "tokens_per_second": self.tokens / elapsed}
        done = step - self.start_step
        per_step = (now - self.start_time) / max(done, 1)
        self.mark_time, self.examples, self.tokens = now, 0, 0
        rates["eta_seconds"] = per_step * (total_steps - step)
        return rates
