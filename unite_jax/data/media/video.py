"""Videos -> patches: frame sampling (qwen-vl-utils' `smart_nframes`), PyAV decoding, frames like images.

See `unite_jax.data.media` for the steps and the reference they replicate.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
from PIL import Image

from unite_jax.data.media.image import array_to_rgb, pil_to_rgb, resize_uint8
from unite_jax.data.media.processor import MediaError, ProcessorConfig, normalize_table, smart_resize
from unite_jax.data.pixel_patches import PixelPatches

# A video may be a file path, a sequence of frames (each an ImageSource other than a path)
# or one [T, H, W, 3] uint8 array.
VideoSource = Union[str, os.PathLike, Sequence[Any], np.ndarray]


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
            out.append(np.asarray(pil_to_rgb(frame), dtype=np.uint8))
        elif isinstance(frame, np.ndarray):
            out.append(array_to_rgb(frame, f"video frame {int(position)}"))
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
    pixels = np.stack([resize_uint8(Image.fromarray(frame), height, width) for frame in frames])
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
