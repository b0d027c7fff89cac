"""Training records from a dataset prepared with tensorflow-datasets (`tfds:NAME[/CONFIG]:SPLIT`).

The dataset is read through `tfds.data_source` (ArrayRecord files, random access, no TensorFlow
at run time); tensorflow-datasets is an optional extra (`pip install unite-jax[tfds]`). It must
have been prepared with `file_format="array_record"`.

`data.tfds_fields` maps the roles below to feature names of the dataset:

    query_text, query_image, query_video, candidate_text, candidate_image, candidate_video,
    negative_text, negative_image, negative_video, target_modal, instruction

An empty name leaves a role unmapped; when every name is empty, each role reads the feature of
the same name, if the dataset has one. Feature values may be:
  - text: a Text feature (bytes / str);
  - image: a path (Text, relative to `data.media_root`, or to the working directory when that is
    empty), encoded image bytes (JPEG, PNG, ...), a uint8 [H, W, 3] tensor, or a sequence of these;
  - video: a path, a sequence of paths, or a uint8 [T, H, W, 3] tensor of frames;
  - target_modal: 'text', 'image', 'video', 'text,image', ... (inferred from the candidate when empty).
"""

from __future__ import annotations

import io
import os
import threading
from typing import Any

import numpy as np

from unite_jax.data.items import item_modality, join_instruction
from unite_jax.data.manifest import RecordSource
from unite_jax.data.records import DataError, Example, RecordError, make_item, modality_code, resolve_media

TFDS_PREFIX = "tfds:"
ROLES = ("query_text", "query_image", "query_video", "candidate_text", "candidate_image", "candidate_video",
         "negative_text", "negative_image", "negative_video", "target_modal", "instruction")


def is_tfds_entry(entry: str) -> bool:
    return entry.startswith(TFDS_PREFIX)


def parse_tfds_entry(entry: str) -> tuple[str, str]:
    """'tfds:NAME[/CONFIG]:SPLIT' -> (NAME[/CONFIG], SPLIT); the split may be a slice like 'train[:90%]'."""
    body = entry[len(TFDS_PREFIX):]
    # the split is after the last ':' outside a slice (NAME may carry ':VERSION', the split '[:90%]')
    bracket = body.find("[")
    colon = (body if bracket < 0 else body[:bracket]).rfind(":")
    name, split = body[:max(colon, 0)], body[colon + 1:]
    if colon < 0 or not name or not split:
        raise DataError(f"data.train: {entry!r}: expected tfds:NAME[/CONFIG]:SPLIT (e.g. tfds:my_pairs/v1:train)")
    return name, split


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError("data.train names a tfds: source but tensorflow-datasets is not installed; "
                        "install the extra: pip install 'unite-jax[tfds]'") from e
    return tfds


class TfdsSource(RecordSource):
    """Random access to the examples of one split of a prepared TFDS dataset."""

    def __init__(self, entry: str, fields: dict[str, str] | None = None, data_dir: str = "", media_root: str = ""):
        self.name = entry
        self.dataset, self.split = parse_tfds_entry(entry)
        self.data_dir = data_dir or None
        self.media_root = media_root or os.getcwd()
        self._lock = threading.Lock()
        self._source = None
        source = self._open()
        self._length = len(source)
        features = set(source.dataset_info.features.keys())
        self.fields = resolve_fields(fields or {}, features, entry)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_source"], state["_lock"] = None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _open(self):
        if self._source is None:
            with self._lock:
                if self._source is None:
                    tfds = _import_tfds()
                    try:
                        self._source = tfds.data_source(self.dataset, split=self.split, data_dir=self.data_dir)
                    except Exception as e:  # tfds raises many kinds (not found, not prepared, wrong format)
                        raise DataError(f"data.train: {self.name}: cannot open with tfds.data_source "
                                        f"(data_dir={self.data_dir!r}): {type(e).__name__}: {e}") from e
        return self._source

    def __len__(self) -> int:
        return self._length

    def where(self, index: int) -> str:
        return f"{self.name}[{index}]"

    def example(self, index: int) -> Example:
        record = self._open()[index]
        return record_to_example(record, self.fields, self.where(index), self.media_root)


def resolve_fields(fields: dict[str, str], features: set[str], entry: str) -> dict[str, str]:
    """Role -> feature name for the roles this dataset provides; errors name unknown roles/features."""
    fields = {role: name for role, name in dict(fields).items() if name}
    unknown_roles = sorted(set(fields) - set(ROLES))
    if unknown_roles:
        raise DataError(f"data.tfds_fields: unknown role(s) {unknown_roles}; expected some of {list(ROLES)}")
    if not fields:
        fields = {role: role for role in ROLES if role in features}
    missing = sorted(f"{role}={name!r}" for role, name in fields.items() if name not in features)
    if missing:
        raise DataError(f"data.tfds_fields: {entry} has no feature(s) {missing}; its features: {sorted(features)}")
    for side in ("query", "candidate"):
        if not any(role.startswith(side) for role in fields):
            raise DataError(f"data.tfds_fields: no {side} field mapped for {entry} (map {side}_text, {side}_image "
                            f"or {side}_video to one of its features: {sorted(features)})")
    return fields


def _as_text(value: Any, field: str) -> str | None:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecordError("invalid record", f"{field}: not UTF-8 text") from e
    if value is None:
        return None
    if not isinstance(value, str):
        raise RecordError("invalid record", f"{field}: expected text, got {type(value).__name__}")
    return value if value.strip() else None


def _image_sources(value: Any, field: str, media_root: str) -> list:
    """A feature value -> list of image sources of an item (paths, PIL images, arrays)."""
    if value is None:
        return []
    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 3:
        return [value] if value.size else []
    if isinstance(value, np.ndarray) and value.dtype == object:
        value = list(value.ravel())
    if isinstance(value, (list, tuple)):
        return [source for v in value for source in _image_sources(v, field, media_root)]
    if isinstance(value, str):
        return resolve_media([value], media_root, field.split("_")[0], field) if value.strip() else []
    if isinstance(value, bytes):
        if not value:
            return []
        try:
            path = value.decode("utf-8")
        except UnicodeDecodeError:  # encoded image bytes (JPEG / PNG headers are not UTF-8)
            return [_decode_image_bytes(value, field)]
        return resolve_media([path], media_root, field.split("_")[0], field) if path.strip() else []
    raise RecordError("invalid record", f"{field}: expected a path, encoded image bytes or a uint8 [H, W, 3] "
                                        f"array, got {type(value).__name__} {getattr(value, 'shape', '')}")


def _decode_image_bytes(data: bytes, field: str):
    from PIL import Image, ImageOps

    from unite_jax.data.media import MediaError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except Exception as e:
        raise MediaError(f"{field}: cannot decode image bytes ({type(e).__name__}: {e})") from e


def _video_sources(value: Any, field: str, media_root: str) -> list | np.ndarray:
    """A feature value -> a list of video paths, or one [T, H, W, 3] uint8 frame array."""
    if value is None:
        return []
    if isinstance(value, np.ndarray) and value.dtype == np.uint8:
        if value.ndim != 4:
            raise RecordError("invalid record", f"{field}: expected [T, H, W, 3] uint8 frames, got shape "
                                                f"{value.shape}")
        return value if value.size else []
    if isinstance(value, np.ndarray) and value.dtype == object:
        value = list(value.ravel())
    values = value if isinstance(value, (list, tuple)) else [value]
    paths = [_as_text(v, field) for v in values]
    return resolve_media([p for p in paths if p], media_root, field.split("_")[0], field)


def record_to_example(record: dict, fields: dict[str, str], where: str, media_root: str) -> Example:
    """A TFDS example dict -> Example through the role -> feature mapping."""

    def get(role):
        return record.get(fields[role]) if role in fields else None

    def side_item(side):
        text = _as_text(get(f"{side}_text"), f"{side}_text")
        if side == "query":
            instruction = _as_text(get("instruction"), "instruction")
            text = join_instruction(instruction, text)
        images = _image_sources(get(f"{side}_image"), f"{side}_image", media_root)
        videos = _video_sources(get(f"{side}_video"), f"{side}_video", media_root)
        has_video = isinstance(videos, np.ndarray) or bool(videos)
        if side == "negative" and text is None and not images and not has_video:
            return None
        return make_item(text, images, videos, side)

    query, candidate = side_item("query"), side_item("candidate")
    negative, negative_error = None, None
    try:
        negative = side_item("negative")
    except (RecordError, ValueError) as e:  # MediaError (undecodable bytes) is a ValueError
        negative_error = e if isinstance(e, RecordError) else RecordError("unreadable media", str(e))
    target = _as_text(get("target_modal"), "target_modal")
    target_modal = item_modality(candidate) if target is None else modality_code(target)
    return Example(query, candidate, negative, target_modal, item_modality(negative) if negative else 0, where,
                   negative_error)
