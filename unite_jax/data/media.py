"""Image and video pre-processing for the Qwen2-VL vision tower (host-side numpy, no JAX).

An image or a video becomes `(patches, grid_thw)`:
  patches   float32 [grid_t * grid_h * grid_w, 3 * temporal_patch_size * patch_size**2]
  grid_thw  int64 [3] = (grid_t, grid_h, grid_w), counted in patches of 14x14 pixels.

The pipeline replicates `transformers.Qwen2VLImageProcessorPil` (the reference the
tests compare against):
  1. convert to RGB (transparency composited onto white, as the reference does);
  2. `smart_resize` to a size whose sides are multiples of patch_size * merge_size = 28
     and whose area lies in [min_pixels, max_pixels];
  3. resize with PIL bicubic on the *uint8* image (the reference converts to a PIL image
     before resizing, so the resized pixels are rounded back to uint8);
  4. rescale: uint8 -> float64 * rescale_factor -> float32, then normalise in float32
     with the CLIP mean/std: (x - mean) / std;
  5. patchify in merge-window order: patch order (t, h/2, w/2, 2, 2), so each 2x2 block
     the merger fuses is contiguous; each patch is flattened as (channel, temporal,
     patch_row, patch_col), the layout of the Conv3d patch embedding's weight.
A single image is repeated to temporal_patch_size frames; a video contributes
consecutive pairs of frames as temporal patches.

Videos are sampled like qwen-vl-utils' `smart_nframes` (see `sample_frame_indices`).

`image_pixel_patches` / `video_pixel_patches` stop before step 4: they return the patches as
uint8 levels (`PixelPatches`), normalised later by a lookup, straight into a batch buffer on the
host or on the device; `preprocess_image` / `preprocess_video` return them normalised.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps

from unite_jax.data.pixel_patches import PixelPatches

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

# An image may be a file path, a PIL image or an array ([H, W], [H, W, 1|3|4] uint8).
ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray]
# A video may be a file path, a sequence of frames (each an ImageSource other than a path)
# or one [T, H, W, 3] uint8 array.
VideoSource = Union[str, os.PathLike, Sequence[Any], np.ndarray]


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
        with open(path, "w") as f:
            json.dump(config, f, indent=2)
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


# --------------------------------------------------------------------------- images


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    """An RGB copy of a PIL image; transparency is composited onto white.

    Same rule as transformers' `convert_to_rgb` for PIL inputs: any mode with an alpha
    band, or a palette/grey image with a `transparency` entry, goes through RGBA and
    `Image.alpha_composite` over an opaque white background.
    """
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _array_to_rgb(array: np.ndarray, what: str) -> np.ndarray:
    """[H, W] / [H, W, 1|3|4] uint8 -> contiguous [H, W, 3] uint8.

    RGBA is blended onto white in float64 and rounded, which is what transformers does
    for numpy RGBA inputs (its PIL path, `_pil_to_rgb`, rounds differently by up to 1).
    """
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8:
        dtype = getattr(array, "dtype", type(array).__name__)
        raise MediaError(f"{what}: expected a uint8 array, got dtype {dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or array.shape[0] < 1 or array.shape[1] < 1:
        raise MediaError(
            f"{what}: expected an array of shape [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {array.shape}"
        )
    channels = array.shape[2]
    if channels == 1:
        return np.ascontiguousarray(np.repeat(array, 3, axis=2))
    if channels == 4:
        alpha = array[:, :, 3:4] / 255.0
        blended = alpha * array[:, :, :3] + (1.0 - alpha) * 255.0
        return np.round(blended).astype(np.uint8)
    return np.ascontiguousarray(array)


def _open_image_file(path: str) -> Image.Image:
    """Decodes an image file fully, applies its EXIF orientation, returns RGB."""
    if not os.path.isfile(path):
        raise MediaError(f"{path}: image file not found" if not os.path.exists(path) else f"{path}: not a file")
    try:
        with Image.open(path) as image:
            # `open` only reads the header; `load` decodes, so a truncated or corrupt body
            # fails here (as long as ImageFile.LOAD_TRUNCATED_IMAGES is left False) rather
            # than later or, worse, silently padded with grey.
            image.load()
            upright = ImageOps.exif_transpose(image)
            return _pil_to_rgb(upright)
    # PIL plugins signal corrupt data with many exception types (OSError including
    # UnidentifiedImageError, SyntaxError, struct.error, EOFError, ValueError,
    # DecompressionBombError, ...); all mean "this file is not a usable image".
    except Exception as e:  # noqa: BLE001
        raise MediaError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


def load_image(source: ImageSource) -> Image.Image:
    """An RGB PIL image from a path, a PIL image, or a uint8 array.

    - path (str / os.PathLike): decoded completely, EXIF orientation applied;
    - PIL image: converted to RGB as is (no EXIF handling: the caller decoded it);
    - array: [H, W] grey, [H, W, 1], [H, W, 3] RGB or [H, W, 4] RGBA, uint8.
    Transparency is composited onto white. Raises MediaError naming the source.
    """
    if isinstance(source, (str, os.PathLike)):
        return _open_image_file(os.fspath(source))
    if isinstance(source, Image.Image):
        return _pil_to_rgb(source)
    if isinstance(source, np.ndarray):
        return Image.fromarray(_array_to_rgb(source, "image array"))
    raise MediaError(f"image: expected a path, a PIL image or a uint8 array, got {type(source).__name__}")


def _resize_uint8(image: Image.Image, height: int, width: int) -> np.ndarray:
    """RGB PIL image -> uint8 [height, width, 3], resized with PIL bicubic like the reference."""
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


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


def patchify(
    frames: np.ndarray, patch_size: int, temporal_patch_size: int, merge_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """[T, H, W, C] -> (patches [T/tp * H/p * W/p, C*tp*p*p], grid_thw [3] int64).

    Patch order (t, h/merge, w/merge, merge_row, merge_col): every merge window is
    contiguous. Each patch flattens as (channel, temporal, patch_row, patch_col), the
    memory layout of the Conv3d kernel it is multiplied with.
    """
    num_frames, height, width, channels = frames.shape
    if num_frames % temporal_patch_size or height % (patch_size * merge_size) or width % (patch_size * merge_size):
        raise ValueError(
            f"patchify: frames {frames.shape} must have T divisible by {temporal_patch_size} and H, W "
            f"divisible by {patch_size * merge_size}"
        )
    grid_t = num_frames // temporal_patch_size
    grid_h, grid_w = height // patch_size, width // patch_size
    blocks = frames.reshape(
        grid_t, temporal_patch_size,
        grid_h // merge_size, merge_size, patch_size,
        grid_w // merge_size, merge_size, patch_size,
        channels,
    )
    # axes: 0 t, 1 tp, 2 block_row, 3 merge_row, 4 patch_row, 5 block_col, 6 merge_col, 7 patch_col, 8 c
    blocks = blocks.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    patches = blocks.reshape(grid_t * grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)
    return patches, np.array([grid_t, grid_h, grid_w], dtype=np.int64)


def image_pixel_patches(image: ImageSource,
                        cfg: ProcessorConfig = ProcessorConfig()) -> tuple[PixelPatches, np.ndarray]:
    """An image -> (its patches as uint8 levels, grid_thw int64 [3] = (1, grid_h, grid_w)).

    `np.asarray` of the first gives `preprocess_image`'s float32 patches; the training
    pipeline writes them straight into its batch buffer instead.
    """
    rgb = load_image(image)
    width, height = rgb.size
    new_height, new_width = smart_resize(height, width, cfg.resize_factor, cfg.min_pixels, cfg.max_pixels)
    pixels = _resize_uint8(rgb, new_height, new_width)
    patches = PixelPatches.from_frames(pixels[None], normalize_table(cfg), patch_size=cfg.patch_size,
                                       temporal_patch_size=cfg.temporal_patch_size, merge_size=cfg.merge_size)
    grid = np.array([1, new_height // cfg.patch_size, new_width // cfg.patch_size], dtype=np.int64)
    return patches, grid


def preprocess_image(image: ImageSource, cfg: ProcessorConfig = ProcessorConfig()) -> tuple[np.ndarray, np.ndarray]:
    """An image -> (patches float32 [grid_h * grid_w, patch_dim], grid_thw int64 [3] = (1, grid_h, grid_w)).

    Equal to `Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)`'s
    pixel_values / image_grid_thw. The image is repeated to temporal_patch_size frames.
    """
    patches, grid_thw = image_pixel_patches(image, cfg)
    return np.asarray(patches), grid_thw


# --------------------------------------------------------------------------- videos


def sample_frame_indices(total_frames: int, native_fps: float, cfg: ProcessorConfig = ProcessorConfig()) -> np.ndarray:
    """Indices int64 [nframes] of the frames to keep from a video of `total_frames` at `native_fps`.

    qwen-vl-utils' `smart_nframes` with FRAME_FACTOR = temporal_patch_size (2):
      nframes = total_frames / native_fps * cfg.video_fps            (1 per second)
      clamped to [ceil2(video_min_frames), floor2(min(video_max_frames, total_frames))],
      then floored to a multiple of 2 (so a 3-frame video gives 2 frames);
      indices = linspace(0, total_frames - 1, nframes), rounded (an even count has an odd
      number of gaps, so no index lands exactly on .5 and the rounding mode is moot).
    Raises ValueError when fewer than 2 frames can be taken.
    """
    factor = cfg.temporal_patch_size
    if total_frames < factor:
        raise ValueError(f"a video needs at least {factor} frames, got {total_frames}")
    if not native_fps > 0:
        raise ValueError(f"video frame rate must be positive, got {native_fps}")
    min_frames = math.ceil(cfg.video_min_frames / factor) * factor
    max_frames = math.floor(min(cfg.video_max_frames, total_frames) / factor) * factor
    wanted = total_frames / native_fps * cfg.video_fps
    wanted = min(max(wanted, min_frames), max_frames, total_frames)
    nframes = max(factor, math.floor(wanted / factor) * factor)
    return np.linspace(0, total_frames - 1, nframes).round().astype(np.int64)


def _frames_from_sequence(frames: Sequence[Any], cfg: ProcessorConfig) -> list[np.ndarray]:
    """Given frames -> list of [H, W, 3] uint8 with an even count, at most video_max_frames.

    More frames than video_max_frames (floored to a multiple of temporal_patch_size) are
    sampled evenly (linspace, like a file); an odd count is padded by repeating the last
    frame, as Qwen2-VL's video processor pads the temporal axis.
    """
    if len(frames) == 0:
        raise MediaError("video: the frame list is empty")
    factor = cfg.temporal_patch_size
    limit = max(factor, cfg.video_max_frames // factor * factor)
    positions = np.arange(len(frames))
    if len(frames) > limit:
        positions = np.linspace(0, len(frames) - 1, limit).round().astype(np.int64)
    out = []
    for position in positions:
        frame = frames[int(position)]
        if isinstance(frame, Image.Image):
            out.append(np.asarray(_pil_to_rgb(frame), dtype=np.uint8))
        elif isinstance(frame, np.ndarray):
            out.append(_array_to_rgb(frame, f"video frame {int(position)}"))
        else:
            raise MediaError(
                f"video frame {int(position)}: expected a uint8 array or a PIL image, got {type(frame).__name__}"
            )
    while len(out) % factor:
        out.append(out[-1])
    return out


def _video_stream_info(path: str) -> tuple[int, float | None]:
    """(frame count from the container, or 0 when unknown; native fps, or None)."""
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise MediaError(f"{path}: no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        total = int(stream.frames or 0)
        if rate is None and stream.duration and stream.time_base and total:
            rate = total / float(stream.duration * stream.time_base)
        return total, (float(rate) if rate else None)


def _decode_frames(path: str, wanted: np.ndarray | None) -> tuple[list[np.ndarray], int]:
    """Decodes frames in order, keeping only indices in `wanted` (None: keep nothing).

    Returns (kept frames [H, W, 3] uint8 in `wanted` order, frames decoded). Stops right
    after the last wanted frame, so a long video is never held in memory.
    """
    import av

    positions: dict[int, list[int]] = {}
    if wanted is not None:
        for slot, index in enumerate(wanted.tolist()):
            positions.setdefault(index, []).append(slot)
    last = max(positions) if positions else None
    kept: list[np.ndarray | None] = [None] * (0 if wanted is None else len(wanted))
    decoded = 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame threading: much faster for long videos
        for frame in container.decode(stream):
            if decoded in positions:
                rgb = frame.to_ndarray(format="rgb24")
                for slot in positions[decoded]:
                    kept[slot] = rgb
            decoded += 1
            if last is not None and decoded > last:
                break
    return [frame for frame in kept if frame is not None], decoded


def _load_video_file(path: str, cfg: ProcessorConfig) -> list[np.ndarray]:
    """Samples frames from a video file (see `sample_frame_indices`) with PyAV."""
    import av

    if not os.path.isfile(path):
        raise MediaError(f"{path}: video file not found" if not os.path.exists(path) else f"{path}: not a file")
    try:
        total, fps = _video_stream_info(path)
        if total <= 0:
            # Some containers (Matroska, WebM) do not store a frame count: count by decoding.
            _, total = _decode_frames(path, None)
        if fps is None:
            raise MediaError(f"{path}: the video stream has no frame rate")
        try:
            wanted = sample_frame_indices(total, fps, cfg)
        except ValueError as e:
            raise MediaError(f"{path}: {e}") from e
        frames, decoded = _decode_frames(path, wanted)
        if len(frames) < len(wanted):
            # The container's frame count was too high; resample with the true count.
            try:
                wanted = sample_frame_indices(decoded, fps, cfg)
            except ValueError as e:
                raise MediaError(f"{path}: only {decoded} decodable frame(s): {e}") from e
            frames, _ = _decode_frames(path, wanted)
    except (av.FFmpegError, OSError, EOFError, ValueError) as e:
        if isinstance(e, MediaError):
            raise
        raise MediaError(f"{path}: cannot decode video ({type(e).__name__}: {e})") from e
    return frames


def load_video(source: VideoSource, cfg: ProcessorConfig = ProcessorConfig()) -> list[np.ndarray]:
    """A video as a list of [H, W, 3] uint8 frames with an even count.

    - path: decoded with PyAV, sampled by `sample_frame_indices` (cfg.video_fps,
      video_min_frames, video_max_frames); only the wanted frames are kept;
    - a sequence of frames (uint8 arrays or PIL images) or a [T, H, W, C] uint8 array:
      used as given, sampled evenly down to video_max_frames if longer, and padded with a
      copy of the last frame to an even count.
    Raises MediaError naming the source and the reason.
    """
    if isinstance(source, (str, os.PathLike)):
        return _load_video_file(os.fspath(source), cfg)
    if isinstance(source, np.ndarray):
        if source.ndim != 4:
            raise MediaError(f"video array: expected shape [T, H, W, C], got {source.shape}")
        return _frames_from_sequence(list(source), cfg)
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        return _frames_from_sequence(source, cfg)
    raise MediaError(f"video: expected a path, a list of frames or a [T, H, W, C] array, got {type(source).__name__}")


def video_pixel_budget(cfg: ProcessorConfig) -> tuple[int, int]:
    """(min_pixels, max_pixels) for one video frame.

    The image budget, shrunk to cfg.video_max_pixels when that is set (min_pixels is
    lowered with it so the range stays valid).
    """
    min_pixels, max_pixels = cfg.min_pixels, cfg.max_pixels
    if cfg.video_max_pixels is not None:
        max_pixels = min(max_pixels, cfg.video_max_pixels)
        min_pixels = min(min_pixels, max_pixels)
    return min_pixels, max_pixels


def video_pixel_patches(video: VideoSource,
                        cfg: ProcessorConfig = ProcessorConfig()) -> tuple[PixelPatches, np.ndarray]:
    """A video -> (its patches as uint8 levels, grid_thw int64 [3]); see `preprocess_video`."""
    frames = load_video(video, cfg)
    first_height, first_width = frames[0].shape[:2]
    min_pixels, max_pixels = video_pixel_budget(cfg)
    height, width = smart_resize(first_height, first_width, cfg.resize_factor, min_pixels, max_pixels)
    pixels = np.stack([_resize_uint8(Image.fromarray(frame), height, width) for frame in frames])
    patches = PixelPatches.from_frames(pixels, normalize_table(cfg), patch_size=cfg.patch_size,
                                       temporal_patch_size=cfg.temporal_patch_size, merge_size=cfg.merge_size)
    grid = np.array([len(frames) // cfg.temporal_patch_size, height // cfg.patch_size, width // cfg.patch_size],
                    dtype=np.int64)
    return patches, grid


def preprocess_video(video: VideoSource, cfg: ProcessorConfig = ProcessorConfig()) -> tuple[np.ndarray, np.ndarray]:
    """A video -> (patches float32 [grid_t * grid_h * grid_w, patch_dim], grid_thw int64 [3]).

    Frames come from `load_video` (idempotent on its own output). Every frame is resized
    to the size smart_resize gives for the FIRST frame under `video_pixel_budget(cfg)`,
    then rescaled and normalised exactly like an image; consecutive frame pairs form the
    temporal patches (grid_t = nframes / 2). Two identical frames give the image's patches.
    """
    patches, grid_thw = video_pixel_patches(video, cfg)
    return np.asarray(patches), grid_thw


# --------------------------------------------------------------------------- positions


def vision_rope_positions(grid_thw: np.ndarray | Sequence[int], merge_size: int = 2) -> np.ndarray:
    """(row, col) of every patch, int32 [N, 2], in the patches' merge-window order.

    grid_thw: [3] or [num_media, 3]; N = sum(t * h * w). Positions restart for each
    temporal slice (the vision rotary embedding is 2-D) and for each medium.
    """
    grids = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    parts = []
    for grid_t, grid_h, grid_w in grids.tolist():
        if grid_h % merge_size or grid_w % merge_size:
            raise ValueError(
                f"vision_rope_positions: grid {grid_h}x{grid_w} is not divisible by merge_size {merge_size}"
            )
        rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
        window_shape = (grid_h // merge_size, merge_size, grid_w // merge_size, merge_size)
        rows = rows.reshape(window_shape).transpose(0, 2, 1, 3).reshape(-1)
        cols = cols.reshape(window_shape).transpose(0, 2, 1, 3).reshape(-1)
        parts.append(np.tile(np.stack([rows, cols], axis=-1), (grid_t, 1)))
    if not parts:
        return np.zeros((0, 2), dtype=np.int32)
    return np.concatenate(parts).astype(np.int32)
