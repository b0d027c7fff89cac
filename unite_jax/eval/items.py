"""Reading items files: one JSON object per line, validated with errors that name FILE:LINE and the field.

An item line is `{"id": str, "text"?: str, "image"?: path | [paths], "video"?: path | [paths]}`, the
item schema of `unite_jax.data.items` with a required id. Media paths are relative to the directory
of the JSONL file (absolute paths are kept) and must exist.
Query files of an evaluation also carry `"positives": [candidate ids]` and optionally
`"candidates": [candidate ids]` (MMEB style). Blank lines are skipped; line numbers count them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

from unite_jax.data.items import ITEM_KEYS, media_paths, model_inputs, resolve_path, with_instruction

MEDIA_KEYS = ("image", "video")
QUERY_KEYS = ("positives", "candidates")


class ItemsError(ValueError):
    """A malformed items file; the message starts with `FILE:LINE:`."""


def read_items(path: str, *, extra_keys: Sequence[str] = (), check_media: bool = True) -> list[dict]:
    """Reads and validates an items JSONL file.

    Returns one dict per non-blank line, in file order, with keys among `id`, `text`, `image`,
    `video` (media paths made absolute) and whichever of `extra_keys` the line has (values as
    read; lists of strings for `positives` / `candidates`, validated here).
    extra_keys: allowed keys beyond ITEM_KEYS, e.g. QUERY_KEYS for the queries of an evaluation.
    check_media: also require every media file to exist (fails before hours of encoding, not in them).
    """
    items, _ = read_items_with_lines(path, extra_keys=extra_keys, check_media=check_media)
    return items


def read_items_with_lines(path: str, *, extra_keys: Sequence[str] = (),
                          check_media: bool = True) -> tuple[list[dict], list[int]]:
    """`read_items` plus the 1-based line number of each item (for later errors about a line)."""
    unknown_extra = sorted(set(extra_keys) - set(QUERY_KEYS))
    if unknown_extra:
        raise ValueError(f"read_items: unsupported extra keys {unknown_extra}; supported: {list(QUERY_KEYS)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: items file does not exist")
    allowed = ITEM_KEYS + tuple(extra_keys)
    base = os.path.dirname(os.path.abspath(path))
    items, lines, first_line_of_id = [], [], {}
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ItemsError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
            if not line.strip():
                continue
            item = parse_item(line, where, allowed, base, check_media)
            if item["id"] in first_line_of_id:
                raise ItemsError(f"{where}: field 'id': duplicate id {item['id']!r} "
                                 f"(first used on line {first_line_of_id[item['id']]})")
            first_line_of_id[item["id"]] = line_no
            items.append(item)
            lines.append(line_no)
    if not items:
        raise ItemsError(f"{path}: no items (the file is empty)")
    return items, lines


def parse_item(line: str, where: str, allowed: Sequence[str], base_dir: str, check_media: bool = True) -> dict:
    """One JSONL line -> a validated item dict; `where` ("FILE:LINE") prefixes every error."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ItemsError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(record, dict):
        raise ItemsError(f"{where}: expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(allowed))
    if unknown:
        raise ItemsError(f"{where}: unknown key(s) {unknown}; allowed: {list(allowed)}")
    item_id = record.get("id")
    if "id" not in record:
        raise ItemsError(f"{where}: missing field 'id' (a non-empty string)")
    if not isinstance(item_id, str) or not item_id:
        raise ItemsError(f"{where}: field 'id': expected a non-empty string, got {item_id!r}")
    item = {"id": item_id}
    text = record.get("text")
    if text is not None:
        if not isinstance(text, str):
            raise ItemsError(f"{where}: field 'text': expected a string, got {type(text).__name__}")
        item["text"] = text
    for key in MEDIA_KEYS:
        paths = _media_paths(record.get(key), key, where, base_dir, check_media)
        if paths:
            item[key] = paths
    if not any(key in item for key in MEDIA_KEYS) and not (text or "").strip():
        raise ItemsError(f"{where}: item {item_id!r} is empty: it needs a non-blank 'text', an 'image' or a 'video'")
    for key in QUERY_KEYS:
        if key in record:
            item[key] = _id_list(record[key], key, where)
    return item


def _media_paths(value, key: str, where: str, base_dir: str, check_media: bool):
    """A path or a list of paths (`media_paths`), resolved against the items file's directory."""
    try:
        paths = media_paths(value, f"{where}: field {key!r}")
    except ValueError as e:
        raise ItemsError(str(e)) from e
    resolved = [resolve_path(p, base_dir) for p in paths]
    if check_media:
        for original, full in zip(paths, resolved):
            if not os.path.isfile(full):
                raise ItemsError(f"{where}: field {key!r}: file {original!r} not found (looked at {full})")
    return resolved if isinstance(value, list) else (resolved[0] if resolved else [])


def _id_list(value, key: str, where: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ItemsError(f"{where}: field {key!r}: expected a non-empty list of candidate ids (strings), "
                         f"got {value!r}")
    if len(set(value)) != len(value):
        duplicates = sorted({v for v in value if value.count(v) > 1})
        raise ItemsError(f"{where}: field {key!r}: repeated id(s) {duplicates}")
    return list(value)


def encode_inputs(items: Sequence[dict], instruction: str | None = None) -> list[dict]:
    """What the model encodes for each item read from a file: its inputs, with `instruction` in front of
    the text as in training (`unite_jax.data.items.with_instruction`)."""
    return [model_inputs(with_instruction(item, instruction)) for item in items]


def file_sha256(path: str, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


def items_fingerprint(path: str, items: Sequence[dict]) -> str:
    """Hash of an items file's bytes and of the size and mtime of every media file it names.

    Keys caches and resumable encodes: an edited JSONL or a replaced image gives a new key.
    """
    digest = hashlib.sha256(file_sha256(path).encode())
    for item in items:
        for key in MEDIA_KEYS:
            sources = item.get(key)
            for source in (sources if isinstance(sources, list) else [sources] if sources else []):
                try:
                    stat = os.stat(source)
                    digest.update(f"{source}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
                except OSError:
                    digest.update(f"{source}\0missing\n".encode())
    return digest.hexdigest()
