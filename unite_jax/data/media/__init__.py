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

Files: processor.py (`ProcessorConfig`, `smart_resize`, the normalisation table), image.py,
video.py. This package's namespace is their public API (`from unite_jax.data import media`).
"""

from unite_jax.data.media.image import ImageSource, image_pixel_patches, load_image, patchify, preprocess_image
from unite_jax.data.media.processor import (
    CLIP_MEAN,
    CLIP_STD,
    PREPROCESSOR_CONFIG,
    PROCESSOR_FILES,
    QWEN2VL_MAX_PIXELS,
    QWEN2VL_MIN_PIXELS,
    UNITE_MAX_PIXELS,
    UNITE_MIN_PIXELS,
    VIDEO_PREPROCESSOR_CONFIG,
    MediaError,
    ProcessorConfig,
    normalize_table,
    smart_resize,
)
from unite_jax.data.media.video import (
    VideoSource,
    load_video,
    preprocess_video,
    sample_frame_indices,
    video_pixel_budget,
    video_pixel_patches,
)

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "PREPROCESSOR_CONFIG", "PROCESSOR_FILES", "QWEN2VL_MAX_PIXELS", "QWEN2VL_MIN_PIXELS",
    "UNITE_MAX_PIXELS", "UNITE_MIN_PIXELS", "VIDEO_PREPROCESSOR_CONFIG", "ImageSource", "MediaError",
    "ProcessorConfig", "VideoSource", "image_pixel_patches", "load_image", "load_video", "normalize_table",
    "patchify", "preprocess_image", "preprocess_video", "sample_frame_indices", "smart_resize",
    "video_pixel_budget", "video_pixel_patches",
]
