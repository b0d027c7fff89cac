"""Training records: the accepted record formats, parsed into `Example`s, and the errors of bad records.

A training example is a (query, candidate[, negative]) triple of items (`unite_jax.data.items`)
plus the candidate's modality code. Two record shapes are accepted, in a JSON array file or as
JSON Lines (`unite_jax.data.manifest` reads the files):

UNITE (the original's JSON format)::

    {"query": {"text": "a cat", "image": "a.jpg"}, "candidate": {"video": ["v.mp4"]},
     "negative": {"text": "..."}, "target_modal": "video", "instruction": "Find the video."}

  an input holds any of `text` (may carry `<|IMAGE|>` / `<|VIDEO|>` placeholders), `image` and
  `video` (a path or a list of paths); `negative`, `target_modal` and `instruction` are optional.
  `instruction` is put in front of the query text (`items.join_instruction`).

MMEB train (VLM2Vec style, instruction already inside the query text)::

    {"qry": "<|image_1|>\\nRepresent the given image.", "qry_image_path": "a.jpg",
     "pos_text": "a cat", "pos_image_path": "", "neg_text": "", "neg_image_path": ""}

  `<|image_N|>` markers become `<|IMAGE|>`.

Empty strings, empty lists and null mean "absent". `target_modal`, when absent, is inferred from
the candidate. Modality codes are bitmasks (`unite_jax.modality`): text=1, image=2, video=4, OR-ed
for fused inputs. Relative media paths are taken relative to a media root (`data.media_root`, or
the manifest's directory when that is empty).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from unite_jax import modality
from unite_jax.data.items import INPUT_KEYS, canonical_text, item_modality, join_instruction, media_paths, resolve_path

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
