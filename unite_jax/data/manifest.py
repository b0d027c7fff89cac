"""Training manifests: random-access record sources over JSON files, and the `data.train` string.

A JSON Lines file is indexed once (byte offset of every line) and its records are read on
demand, so a manifest of millions of lines is never held in memory; a JSON array file is indexed
the same way (the byte span of each element) after one parse. The record formats themselves are
in `unite_jax.data.records`.
"""

from __future__ import annotations

import abc
import json
import os
import threading

import numpy as np

from unite_jax.data.records import DataError, Example, decode_json, parse_record


class RecordSource(abc.ABC):
    """Random access to the records of one `data.train` entry.

    len(source) records; `source.example(i)` -> Example, None for a blank JSON line (skipped
    without counting), or raises RecordError. Picklable (file handles are reopened in each process).
    """

    name: str

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of records."""

    @abc.abstractmethod
    def example(self, index: int) -> Example | None:
        """Record `index` parsed, with media paths resolved and checked."""

    @abc.abstractmethod
    def where(self, index: int) -> str:
        """Where record `index` is, for messages."""


class _FileSource(RecordSource):
    """Shared file handling: a lazily opened descriptor read with pread (thread-safe, no seek)."""

    def __init__(self, path: str, media_root: str):
        self.path = path
        self.name = path
        self.media_root = media_root or os.path.dirname(os.path.abspath(path))
        self._fd: int | None = None
        self._lock = threading.Lock()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fd"], state["_lock"] = None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _read(self, offset: int, length: int) -> bytes:
        if self._fd is None:
            with self._lock:
                if self._fd is None:
                    try:
                        self._fd = os.open(self.path, os.O_RDONLY)
                    except OSError as e:
                        raise DataError(f"{self.path}: cannot open the manifest ({e})") from e
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise DataError(f"{self.path}: the manifest changed while training (expected {length} bytes at "
                            f"offset {offset}, read {len(data)})")
        return data

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass


class JsonlSource(_FileSource):
    """One JSON object per line. Records are lines (blank lines are skipped); where = `file:line`."""

    def __init__(self, path: str, media_root: str = ""):
        super().__init__(path, media_root)
        self.line_starts = _line_starts(path)  # int64 [lines + 1]; the last entry is the file size

    def __len__(self) -> int:
        return len(self.line_starts) - 1

    def where(self, index: int) -> str:
        return f"{self.path}:{index + 1}"

    def example(self, index: int) -> Example | None:
        start, end = int(self.line_starts[index]), int(self.line_starts[index + 1])
        payload = self._read(start, end - start)
        if not payload.strip():
            return None
        return parse_record(decode_json(payload), self.where(index), self.media_root)


class JsonArraySource(_FileSource):
    """A JSON array of records (UNITE's format); where = `file:line [element i]`."""

    def __init__(self, path: str, media_root: str = ""):
        super().__init__(path, media_root)
        self.spans, self.lines = _index_json_array(path)  # int64 [n, 2] byte (start, end); int64 [n]

    def __len__(self) -> int:
        return len(self.spans)

    def where(self, index: int) -> str:
        return f"{self.path}:{int(self.lines[index])} [element {index}]"

    def example(self, index: int) -> Example:
        start, end = (int(v) for v in self.spans[index])
        return parse_record(decode_json(self._read(start, end - start)), self.where(index), self.media_root)


def _line_starts(path: str, chunk_bytes: int = 1 << 24) -> np.ndarray:
    """Byte offsets int64 [lines + 1] of every line start, plus the file size (read in chunks)."""
    starts = [np.zeros(1, np.int64)]
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            newlines = np.flatnonzero(np.frombuffer(chunk, np.uint8) == ord("\n"))
            starts.append(newlines.astype(np.int64) + size + 1)
            size += len(chunk)
    starts = np.concatenate(starts)
    if starts[-1] != size:  # the last line has no newline
        starts = np.append(starts, size)
    return starts


def _index_json_array(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Byte spans int64 [n, 2] and 1-based start lines int64 [n] of the elements of a JSON array file.

    Raises DataError with file:line:column when the file is not one well-formed JSON array (a
    broken array cannot be split into records reliably, unlike JSON Lines).
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    decoder = json.JSONDecoder()
    ascii_only = text.isascii()

    def fail(pos: int, what: str):
        line = text.count("\n", 0, pos) + 1
        column = pos - (text.rfind("\n", 0, pos) + 1) + 1
        raise DataError(f"{path}:{line}:{column}: malformed JSON array: {what}")

    def skip_space(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    pos = skip_space(0)
    if pos >= len(text) or text[pos] != "[":
        fail(pos, "expected '[' (a JSON array of records; use .jsonl for one record per line)")
    pos = skip_space(pos + 1)
    char_spans, lines = [], []
    line, line_pos = 1, 0
    if pos < len(text) and text[pos] == "]":
        pos += 1
    else:
        while True:
            try:
                _, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                fail(e.pos, e.msg)
            line += text.count("\n", line_pos, pos)
            line_pos = pos
            char_spans.append((pos, end))
            lines.append(line)
            pos = skip_space(end)
            if pos < len(text) and text[pos] == ",":
                pos = skip_space(pos + 1)
                continue
            if pos < len(text) and text[pos] == "]":
                pos += 1
                break
            fail(pos, "expected ',' or ']' after an element")
    if skip_space(pos) != len(text):
        fail(skip_space(pos), "extra data after the array")
    spans = np.asarray(char_spans, np.int64).reshape(-1, 2)
    if not ascii_only:  # character offsets -> byte offsets
        byte_spans, last_char, last_byte = [], 0, 0
        for start, end in char_spans:
            byte_start = last_byte + len(text[last_char:start].encode("utf-8"))
            byte_end = byte_start + len(text[start:end].encode("utf-8"))
            byte_spans.append((byte_start, byte_end))
            last_char, last_byte = end, byte_end
        spans = np.asarray(byte_spans, np.int64).reshape(-1, 2)
    return spans, np.asarray(lines, np.int64)


def open_manifest(path: str, media_root: str = "") -> RecordSource:
    """A JSON array or JSON Lines manifest, told apart by its first non-blank character ('[' or '{')."""
    if not os.path.isfile(path):
        raise DataError(f"data.train: manifest {path} not found")
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
        while not head:
            block = f.read(4096)
            if not block:
                break
            head = block.lstrip()
    if head.startswith(b"\xef\xbb\xbf"):
        raise DataError(f"{path}: starts with a UTF-8 byte-order mark; save it without one")
    if head.startswith(b"["):
        return JsonArraySource(path, media_root)
    return JsonlSource(path, media_root)


# --------------------------------------------------------------------------- data.train


def parse_train_spec(spec: str) -> list[tuple[str, float]]:
    """'a.json@2,b.jsonl,tfds:ds/cfg:train@0.5' -> [(entry, weight)], weight 1 when not given."""
    entries = []
    for raw in spec.split(","):
        entry = raw.strip()
        if not entry:
            continue
        weight = 1.0
        if "@" in entry:
            head, tail = entry.rsplit("@", 1)
            try:
                weight = float(tail)
            except ValueError:
                head = entry  # an '@' that is part of the name
            entry = head.strip()
            if not weight > 0:
                raise DataError(f"data.train: entry {raw.strip()!r}: the weight must be positive, got {tail}")
        entries.append((entry, weight))
    if not entries:
        raise DataError("data.train is empty: name one or more manifests (.json / .jsonl) or tfds:NAME:SPLIT, "
                        "separated by commas, each optionally suffixed @weight")
    return entries
