"""Pre-processing settings (`ProcessorConfig`, read from a model directory) and the sizes they imply.

`smart_resize` is Qwen2-VL's target image size; `normalize_table` the normalised value of every
uint8 level, the lookup that turns pixel levels into the float32 patches the reference computes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any

import numpy as np

from unite_jax import files

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The budgets of Qwen2-VL's image processor class (what a checkpoint without a
# preprocessor_config.json gets in transformers).
QWEN2VL_MIN_PIXELS = 56 * 56
QWEN2VL_MAX_PIXELS = 28 * 28 * 1280
# UNITE's training budgets for images.
UNITE_MIN_PIXELS = 256 * 28 * 28
UNITE_MAX_PIXELS = 1280 * 28 * 28

PREPROCESSOR_CONFIG = "preprocessor_config.json"
VIDEO_PREPROCESSOR_CONFIG = "video_preprocessor_config.json"
# The pre-processing files a model directory carries (transformers' names).
PROCESSOR_FILES = (PREPROCESSOR_CONFIG, VIDEO_PREPROCESSOR_CONFIG, "processor_config.json")


class MediaError(ValueError):
    """An image or video that cannot be used; the message names the source and the reason."""


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class ProcessorConfig:
    """Pre-processing settings.

    The field defaults are UNITE's training recipe (min_pixels = 256*28*28, up to 12
    frames at 1 fps). `from_pretrained` starts instead from the defaults of Qwen2-VL's
    image processor class (min_pixels = 56*56), as transformers would.
    """

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = UNITE_MIN_PIXELS
    max_pixels: int = UNITE_MAX_PIXELS
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255
    video_fps: float = 1.0
    video_min_frames: int = 4
    video_max_frames: int = 12
    # Optional extra per-frame pixel budget for video frames, applied on top of
    # min_pixels/max_pixels (UNITE used about 240*320). None: frames use the image budget.
    video_max_pixels: int | None = None

    def __post_init__(self):
        # Lists from JSON or callers become tuples so the config stays hashable.
        object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels",
                     "video_min_frames", "video_max_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"ProcessorConfig.{name}: expected a positive integer, got {value!r}")
        if self.video_max_pixels is not None and (
            isinstance(self.video_max_pixels, bool) or not isinstance(self.video_max_pixels, (int, np.integer))
            or self.video_max_pixels < 1
        ):
            raise ValueError(
                f"ProcessorConfig.video_max_pixels: expected a positive integer or None, got {self.video_max_pixels!r}"
            )
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"ProcessorConfig: min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels})"
            )
        if self.video_min_frames > self.video_max_frames:
            raise ValueError(
                f"ProcessorConfig: video_min_frames ({self.video_min_frames}) must not exceed "
                f"video_max_frames ({self.video_max_frames})"
            )
        if not self.video_fps > 0:
            raise ValueError(f"ProcessorConfig.video_fps: expected a positive number, got {self.video_fps!r}")
        if not self.rescale_factor > 0:
            raise ValueError(f"ProcessorConfig.rescale_factor: expected a positive number, got {self.rescale_factor!r}")
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"ProcessorConfig.{name}: expected 3 values (R, G, B), got {getattr(self, name)!r}")
        if min(self.image_std) <= 0:
            raise ValueError(f"ProcessorConfig.image_std: expected positive values, got {self.image_std!r}")

    @property
    def resize_factor(self) -> int:
        """Both sides of a resized image are multiples of this (28 for Qwen2-VL)."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: 3 * temporal_patch_size * patch_size**2 (1176)."""
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, **overrides) -> "ProcessorConfig":
        """Reads `preprocessor_config.json` (and `video_preprocessor_config.json`) of a model directory.

        Precedence, lowest first: Qwen2-VL image-processor class defaults (min_pixels
        56*56 = 3136, max_pixels 28*28*1280 = 1003520, patch 14, temporal patch 2, merge 2,
        CLIP mean/std, rescale 1/255) and this class's video defaults (1 fps, 4..12 frames);
        then `preprocessor_config.json`; then `video_preprocessor_config.json` (fps,
        min_frames, max_frames only; its `size` is ignored because UNITE sized video frames
        with the image budget); then `overrides` (field names of this class).

        The pixel budget is read from top-level `min_pixels`/`max_pixels` (older
        checkpoints) or `size: {"shortest_edge", "longest_edge"}` (transformers 5.x); when
        both are present the top-level keys win, as they do in transformers.
        """
        model_dir = os.fspath(model_dir)
        fields: dict[str, Any] = {"min_pixels": QWEN2VL_MIN_PIXELS, "max_pixels": QWEN2VL_MAX_PIXELS}

        image_path = os.path.join(model_dir, PREPROCESSOR_CONFIG)
        if os.path.exists(image_path):
            fields.update(_image_fields_from_json(_read_json_object(image_path), image_path))

        video_path = os.path.join(model_dir, VIDEO_PREPROCESSOR_CONFIG)
        if os.path.exists(video_path):
            fields.update(_video_fields_from_json(_read_json_object(video_path), video_path))

        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(
                f"ProcessorConfig.from_pretrained: unknown override(s) {unknown}; expected some of {sorted(known)}"
            )
        fields.update(overrides)
        return cls(**fields)

    def save_pretrained(self, model_dir: str | os.PathLike) -> str:
        """Writes `preprocessor_config.json` that this class, transformers 4.x and 5.x all read.

        The pixel budget goes both to `size` (5.x) and to `min_pixels`/`max_pixels` (4.x);
        video settings, which transformers' image processor does not know, are not written.
        Returns the file's path.
        """
        config = {
            "image_processor_type": "Qwen2VLImageProcessor",
            "do_convert_rgb": True, "do_resize": True, "do_rescale": True, "do_normalize": True,
            "resample": 3,  # bicubic
            "rescale_factor": self.rescale_factor,
            "image_mean": list(self.image_mean), "image_std": list(self.image_std),
            "patch_size": self.patch_size, "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
            "min_pixels": self.min_pixels, "max_pixels": self.max_pixels,
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
        }
        os.makedirs(model_dir, exist_ok=True)
        path = os.path.join(os.fspath(model_dir), PREPROCESSOR_CONFIG)
        files.write_text(path, json.dumps(config, indent=2))
        return path


def _read_json_object(path: str) -> dict:
    """The JSON object in `path`; errors name the file (and line/column for syntax errors)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def _json_positive_int(data: dict, key: str, path: str) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{path}: field {key!r}: expected a positive integer, got {value!r}")
    return value


def _json_positive_number(data: dict, key: str, path: str) -> float:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{path}: field {key!r}: expected a positive number, got {value!r}")
    return float(value)


def _json_rgb_triple(data: dict, key: str, path: str) -> tuple[float, float, float]:
    value = data[key]
    if (not isinstance(value, list) or len(value) != 3
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value)):
        raise ValueError(f"{path}: field {key!r}: expected a list of 3 numbers (R, G, B), got {value!r}")
    return tuple(float(v) for v in value)


def _image_fields_from_json(data: dict, path: str) -> dict[str, Any]:
    """ProcessorConfig fields present in a preprocessor_config.json object."""
    fields: dict[str, Any] = {}
    size = data.get("size")
    if size is not None:
        if not isinstance(size, dict):
            raise ValueError(f"{path}: field 'size': expected an object, got {size!r}")
        # Some saves spell the budget keys min_pixels/max_pixels inside `size`.
        for json_key, alias, field in (("shortest_edge", "min_pixels", "min_pixels"),
                                       ("longest_edge", "max_pixels", "max_pixels")):
            key = json_key if json_key in size else alias if alias in size else None
            if key is None:
                if field not in data:
                    raise ValueError(
                        f"{path}: field 'size': expected keys 'shortest_edge' and 'longest_edge' "
                        f"(the pixel budget), got {sorted(size)}"
                    )
                continue
            fields[field] = _json_positive_int(size, key, f"{path}: field 'size'")
    for key in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
        if data.get(key) is not None:
            fields[key] = _json_positive_int(data, key, path)
    for key in ("image_mean", "image_std"):
        if data.get(key) is not None:
            fields[key] = _json_rgb_triple(data, key, path)
    if data.get("rescale_factor") is not None:
        fields["rescale_factor"] = _json_positive_number(data, "rescale_factor", path)
    return fields


def _video_fields_from_json(data: dict, path: str) -> dict[str, Any]:
    """Video sampling fields present in a video_preprocessor_config.json object (null = absent)."""
    fields: dict[str, Any] = {}
    if data.get("fps") is not None:
        fields["video_fps"] = _json_positive_number(data, "fps", path)
    if data.get("min_frames") is not None:
        fields["video_min_frames"] = _json_positive_int(data, "min_frames", path)
    if data.get("max_frames") is not None:
        fields["video_max_frames"] = _json_positive_int(data, "max_frames", path)
    return fields


# --------------------------------------------------------------------------- sizes


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = QWEN2VL_MIN_PIXELS,
    max_pixels: int = QWEN2VL_MAX_PIXELS,
) -> tuple[int, int]:
    """Qwen2-VL's target size for an image of `height` x `width` pixels.

    Both sides become multiples of `factor`, the area lands in [min_pixels, max_pixels]
    (up to rounding), and the aspect ratio is kept as well as possible:
    - each side is first rounded to the nearest multiple of `factor` (Python's `round`,
      so exact halves go to the even multiple);
    - if that area exceeds max_pixels, both sides are scaled by sqrt(max_pixels / area)
      and rounded *down* (never below `factor`);
    - if it is below min_pixels, both sides are scaled by sqrt(min_pixels / area) and
      rounded *up*.
    Same results as transformers 5.x, which accepts images smaller than `factor` (they
    are scaled up); transformers 4.x raised for them.

    Raises ValueError for non-positive sides and aspect ratios above 200.
    """
    if height < 1 or width < 1:
        raise ValueError(f"smart_resize: image size must be positive, got height={height}, width={width}")
    aspect_ratio = max(height, width) / min(height, width)
    if aspect_ratio > 200:
        raise ValueError(
            f"smart_resize: absolute aspect ratio must be at most 200, got {aspect_ratio} "
            f"(height={height}, width={width})"
        )
    new_height = round(height / factor) * factor
    new_width = round(width / factor) * factor
    if new_height * new_width > max_pixels:
        # Same operation order as the reference so float rounding agrees bit for bit.
        shrink = math.sqrt((height * width) / max_pixels)
        new_height = max(factor, math.floor(height / shrink / factor) * factor)
        new_width = max(factor, math.floor(width / shrink / factor) * factor)
    elif new_height * new_width < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        new_height = math.ceil(height * grow / factor) * factor
        new_width = math.ceil(width * grow / factor) * factor
    return new_height, new_width


def normalize_table(cfg: ProcessorConfig) -> np.ndarray:
    """float32 [3, 256]: each uint8 level's rescaled, normalised value per channel (see _normalize_table)."""
    return _normalize_table(cfg.rescale_factor, tuple(cfg.image_mean), tuple(cfg.image_std))


@functools.lru_cache(maxsize=16)
def _normalize_table(rescale_factor: float, mean: tuple, std: tuple) -> np.ndarray:
    """float32 [3, 256]: the normalised value of every uint8 level in each channel, computed the
    reference's way (float64 multiply by rescale_factor, cast to float32, float32 (x - mean) / std).
    That arithmetic depends only on (channel, level), so a lookup gives the reference's bits."""
    levels = (np.arange(256, dtype=np.float64) * rescale_factor).astype(np.float32)
    mean = np.asarray(mean, dtype=np.float32)[:, None]
    std = np.asarray(std, dtype=np.float32)[:, None]
    table = (levels[None, :] - mean) / std
    table.flags.writeable = False
    return table
