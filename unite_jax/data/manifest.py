"""Training manifests: record formats, random-access record sources, and the `data.train` string.

A training example is a (query, candidate[, negative]) triple of inputs plus the candidate's
modality code. Three record shapes are accepted, in a JSON array file or as JSON Lines:

UNITE (the original's JSON format)::

    {"query": {"text": "a cat", "image": "a.jpg"}, "candidate": {"video": ["v.mp4"]},
     "negative": {"text": "..."}, "target_modal": "video", "instruction": "Find the video."}

  an input holds any of `text` (may carry `<|IMAGE|>` / `<|VIDEO|>` placeholders), `image` and
  `video` (a path or a list of paths); `negative`, `target_modal` and `instruction` are optional.
  `instruction` is put in front of the query text (instruction, newline, text).

MMEB train (VLM2Vec style, instruction already inside the query text)::

    {"qry": "<|image_1|>\\nRepresent the given image.", "qry_image_path": "a.jpg",
     "pos_text": "a cat", "pos_image_path": "", "neg_text": "", "neg_image_path": ""}

  `<|image_N|>` markers become `<|IMAGE|>`.

Empty strings, empty lists and null mean "absent". `target_modal`, when absent, is inferred from
the candidate. Modality codes are bitmasks: text=1, image=2, video=4, OR-ed for fused inputs.
Relative media paths are taken relative to a media root (`data.media_root`, or the manifest's
directory when that is empty).

A JSON Lines file is indexed once (byte offset of every line) and its records are read on
demand, so a manifest of millions of lines is never held in memory; a JSON array file is indexed
the same way (the byte span of each element) after one parse.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import os
import threading
from typing import Any

import numpy as np

from unite_jax import modality
from unite_jax.data.items import (
    INPUT_KEYS,
    canonical_text,
    item_modality,
    join_instruction,
    media_paths,
    resolve_path,
)

MMEB_KEYS = ("qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path")

# Kinds of skipped records. The first group is bad input; the second is valid input that this
# run's static shapes or settings cannot use.
BAD_INPUT_KINDS = ("malformed json", "invalid record", "empty record", "unknown modality", "missing file",
                   "unreadable media")
DROP_KINDS = ("too long", "no negative")


class DataError(ValueError):
    """A training-data problem that stops the run (strict mode, too many bad records, a broken manifest)."""


class RecordError(ValueError):
    """One record that cannot be used; `kind` is one of BAD_INPUT_KINDS or DROP_KINDS."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


@dataclasses.dataclass(frozen=True)
class BadRecord:
    """A skipped record: where it is (`file:line`, `file:line [element i]`, `tfds:...[i]`) and why."""

    where: str
    kind: str
    message: str

    @property
    def reason(self) -> str:
        return f"{self.kind}: {self.message}"

    @property
    def is_drop(self) -> bool:
        """True for valid records this run cannot use (too long, no negative), False for bad input."""
        return self.kind in DROP_KINDS


@dataclasses.dataclass
class Example:
    """One parsed record. Inputs are items (`unite_jax.data.items`): `text` (str or None),
    `image` (list of sources), `video` (list of paths, or one [T, H, W, 3] frame array)."""

    query: dict
    candidate: dict
    negative: dict | None
    target_modal: int
    negative_modal: int  # 0 when there is no negative
    where: str
    # Why the record's negative is unusable (e.g. its file is missing). Raised only when hard
    # negatives are used, so a broken negative does not cost the example otherwise.
    negative_error: RecordError | None = None


# --------------------------------------------------------------------------- records


def modality_code(value: Any, field: str = "target_modal") -> int:
    """`unite_jax.modality.parse` with RecordError("unknown modality") for anything it rejects."""
    try:
        return modality.parse(value, field)
    except ValueError as e:
        raise RecordError("unknown modality", str(e)) from e


def _media_list(value: Any, role: str, field: str) -> list[str]:
    """A path or a list of paths -> list of non-empty paths (empty strings / lists mean absent)."""
    try:
        return media_paths(value, f"{role}.{field}")
    except ValueError as e:
        raise RecordError("invalid record", str(e)) from e


def resolve_media(paths: list[str], media_root: str, role: str, field: str) -> list[str]:
    """Joins relative paths to `media_root`; RecordError("missing file") names the first absent one."""
    out = []
    for path in paths:
        full = resolve_path(path, media_root)
        if not os.path.isfile(full):
            raise RecordError("missing file", f"{role}.{field}: {full} not found")
        out.append(full)
    return out


def _text(value: Any, role: str, field: str = "text") -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise RecordError("invalid record", f"{role}.{field}: expected a string, got {type(value).__name__}")
    return value if value.strip() else None


def make_item(text: str | None, images: list, videos: list | np.ndarray, role: str) -> dict:
    """An input dict for prepare_item; RecordError("empty record") when it holds nothing."""
    has_video = isinstance(videos, np.ndarray) or bool(videos)
    if text is None and not images and not has_video:
        raise RecordError("empty record", f"{role}: no text, image or video")
    # None, not [], for absent media: prepare_item reads an empty list as a video with no frames
    return {"text": text, "image": list(images) or None, "video": videos if has_video else None}


def parse_unite_item(obj: Any, role: str, media_root: str) -> dict:
    """A UNITE input object {"text"?, "image"?, "video"?} -> input dict with resolved paths."""
    if not isinstance(obj, dict):
        raise RecordError("invalid record", f"{role}: expected an object with text/image/video, got "
                                            f"{type(obj).__name__}")
    unknown = sorted(set(obj) - set(INPUT_KEYS))
    if unknown:
        raise RecordError("unknown modality", f"{role}: unknown modality key(s) {unknown}; expected some of "
                                              f"{list(INPUT_KEYS)}")
    text = _text(obj.get("text"), role)
    images = resolve_media(_media_list(obj.get("image"), role, "image"), media_root, role, "image")
    videos = resolve_media(_media_list(obj.get("video"), role, "video"), media_root, role, "video")
    return make_item(text, images, videos, role)


def _is_empty(value: Any) -> bool:
    return value is None or value == "" or value == [] or value == {}


def parse_unite_record(obj: dict, where: str, media_root: str) -> Example:
    """A UNITE record (query / candidate / negative? / target_modal? / instruction?) -> Example."""
    for role in ("query", "candidate"):
        if _is_empty(obj.get(role)):
            raise RecordError("invalid record", f"missing {role!r} (a record needs 'query' and 'candidate'; "
                                                f"keys present: {sorted(obj)})")
    query_obj = obj["query"]
    instruction = _text(obj.get("instruction"), "record", "instruction")
    if instruction is not None:
        if not isinstance(query_obj, dict):
            raise RecordError("invalid record", f"query: expected an object, got {type(query_obj).__name__}")
        query_obj = dict(query_obj, text=join_instruction(instruction, _text(query_obj.get("text"), "query")))
    query = parse_unite_item(query_obj, "query", media_root)
    candidate = parse_unite_item(obj["candidate"], "candidate", media_root)
    negative, negative_error = None, None
    if not _is_empty(obj.get("negative")):
        try:
            negative = parse_unite_item(obj["negative"], "negative", media_root)
        except RecordError as e:
            negative_error = e
    target = obj.get("target_modal")
    target_modal = item_modality(candidate) if _is_empty(target) else modality_code(target)
    return Example(query, candidate, negative, target_modal, item_modality(negative) if negative else 0, where,
                   negative_error)


def _mmeb_item(obj: dict, text_key: str, image_key: str, role: str, media_root: str) -> dict | None:
    text = canonical_text(_text(obj.get(text_key), role, text_key))
    images = resolve_media(_media_list(obj.get(image_key), role, image_key), media_root, role, image_key)
    if text is None and not images:
        return None
    return make_item(text, images, [], role)


def parse_mmeb_record(obj: dict, where: str, media_root: str) -> Example:
    """An MMEB train record (qry, qry_image_path, pos_text, pos_image_path, neg_text?, neg_image_path?)."""
    unknown_modal = sorted(k for k in obj if k.endswith(("_video_path", "_audio_path")))
    if unknown_modal:
        raise RecordError("unknown modality", f"MMEB record: unsupported field(s) {unknown_modal}")
    query = _mmeb_item(obj, "qry", "qry_image_path", "query", media_root)
    candidate = _mmeb_item(obj, "pos_text", "pos_image_path", "candidate", media_root)
    if query is None or candidate is None:
        role = "query (qry / qry_image_path)" if query is None else "candidate (pos_text / pos_image_path)"
        raise RecordError("empty record", f"{role}: no text or image")
    negative, negative_error = None, None
    try:
        negative = _mmeb_item(obj, "neg_text", "neg_image_path", "negative", media_root)
    except RecordError as e:
        negative_error = e
    return Example(query, candidate, negative, item_modality(candidate), item_modality(negative) if negative else 0,
                   where, negative_error)


def parse_record(obj: Any, where: str, media_root: str) -> Example:
    """Any accepted record shape -> Example; RecordError names the kind and the field."""
    if not isinstance(obj, dict):
        raise RecordError("invalid record", f"expected a JSON object, got {type(obj).__name__}")
    if not obj:
        raise RecordError("empty record", "the record is {}")
    if any(key in obj for key in MMEB_KEYS):
        return parse_mmeb_record(obj, where, media_root)
    return parse_unite_record(obj, where, media_root)


def decode_json(payload: bytes) -> Any:
    """JSON text -> object; RecordError("malformed json") with the column on failure."""
    try:
        return json.loads(payload)
    except UnicodeDecodeError as e:
        raise RecordError("malformed json", f"not UTF-8 text ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise RecordError("malformed json", f"{e.msg} at column {e.colno}") from e


# --------------------------------------------------------------------------- sources


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
