"""Images -> patches: decoding (EXIF orientation, RGB), `smart_resize`, bicubic on uint8, patchify.

See `unite_jax.data.media` for the steps and the reference they replicate.
"""

from __future__ import annotations

import os
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from unite_jax.data.media.processor import MediaError, ProcessorConfig, normalize_table, smart_resize
from unite_jax.data.pixel_patches import PixelPatches

# An image may be a file path, a PIL image or an array ([H, W], [H, W, 1|3|4] uint8).
ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray]


def pil_to_rgb(image: Image.Image) -> Image.Image:
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


def array_to_rgb(array: np.ndarray, what: str) -> np.ndarray:
    """[H, W] / [H, W, 1|3|4] uint8 -> contiguous [H, W, 3] uint8.

    RGBA is blended onto white in float64 and rounded, which is what transformers does
    for numpy RGBA inputs (its PIL path, `pil_to_rgb`, rounds differently by up to 1).
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
            return pil_to_rgb(upright)
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
        return pil_to_rgb(source)
    if isinstance(source, np.ndarray):
        return Image.fromarray(array_to_rgb(source, "image array"))
    raise MediaError(f"image: expected a path, a PIL image or a uint8 array, got {type(source).__name__}")


def resize_uint8(image: Image.Image, height: int, width: int) -> np.ndarray:
    """RGB PIL image -> uint8 [height, width, 3], resized with PIL bicubic like the reference."""
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


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
    pixels = resize_uint8(rgb, new_height, new_width)
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
