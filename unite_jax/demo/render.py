"""Pictures, videos and files of the demo dataset: digits and photo crops rendered, MP4 / PNG / JSON written.

The digits are scikit-learn's 8x8 drawings (ink 0..16) drawn in a colour on black, still (112x112,
one vision patch per drawing pixel) or moving one way across 8 frames; the photos are square crops
of scikit-image's sample photos. `MediaWriter` writes PNGs and lossless MP4s whose decoded frames
depend on the pixels alone. `unite_jax.demo.dataset` builds the dataset from these pieces.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Colour words the tiny tokenizer knows ("red", "green" are single tokens; "blue" is spelled
# out in byte pieces, which a small model still learns).
COLORS = {"red": (230, 40, 40), "green": (40, 200, 40), "blue": (40, 80, 240)}
# (row step, column step) of each direction in image coordinates (rows grow downwards).
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
# scikit-image sample -> what the caption calls it.
PHOTOS = {
    "astronaut": "an astronaut", "coffee": "coffee", "rocket": "a rocket", "camera": "a camera",
    "coins": "coins", "horse": "a horse", "chelsea": "a cat", "brick": "a brick", "grass": "grass",
    "moon": "the moon", "text": "text", "page": "a page", "clock": "a clock",
}

IMAGE_SIZE = 112          # digit images: 8x8 drawing upscaled 14x
VIDEO_SIZE = 112          # video frames
VIDEO_DIGIT_SCALE = 7     # the drawing is 56x56 inside a video frame
VIDEO_FRAMES = 8
VIDEO_FPS = 8
VIDEO_STEP = 7            # pixels per frame: 7 steps of 7 = 49 of the 56 free pixels
PHOTO_SIZE = 56


# --------------------------------------------------------------------------- rendering


def render_digit(drawing: np.ndarray, color: Sequence[int], scale: int) -> np.ndarray:
    """A digit drawing -> uint8 [8*scale, 8*scale, 3]: ink intensity (0..16) times `color` on black.

    drawing: [8, 8] values in 0..16 (sklearn's digits). Each drawing pixel becomes a
    scale x scale block (nearest neighbour), so the 8x8 structure survives exactly.
    """
    ink = np.asarray(drawing, dtype=np.float64) / 16.0
    rgb = np.rint(ink[:, :, None] * np.asarray(color, dtype=np.float64)[None, None, :]).astype(np.uint8)
    return np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)


def render_digit_image(drawing: np.ndarray, color: Sequence[int]) -> np.ndarray:
    """uint8 [112, 112, 3]: the drawing upscaled 14x (one vision patch per drawing pixel)."""
    return render_digit(drawing, color, IMAGE_SIZE // 8)


def motion_offsets(direction: str, start: int, cross: int) -> list[tuple[int, int]]:
    """Top-left (row, col) of the digit in each of the VIDEO_FRAMES frames.

    The digit travels VIDEO_STEP pixels per frame along the direction, starting `start`
    pixels from the edge it leaves; `cross` is its fixed position on the other axis.
    Both lie in [0, VIDEO_SIZE - 8 * VIDEO_DIGIT_SCALE - (VIDEO_FRAMES - 1) * VIDEO_STEP] for
    `start` and [0, VIDEO_SIZE - 8 * VIDEO_DIGIT_SCALE] for `cross`.
    """
    free = VIDEO_SIZE - 8 * VIDEO_DIGIT_SCALE
    d_row, d_col = DIRECTIONS[direction]
    offsets = []
    for t in range(VIDEO_FRAMES):
        along = start + t * VIDEO_STEP
        if d_row + d_col < 0:  # moving towards row/col 0: start from the far edge
            along = free - along
        offsets.append((along, cross) if d_row else (cross, along))
    return offsets


def render_digit_video(drawing: np.ndarray, color: Sequence[int], direction: str, start: int,
                       cross: int) -> np.ndarray:
    """uint8 [VIDEO_FRAMES, 112, 112, 3]: the drawing (56x56) moving one way on black."""
    sprite = render_digit(drawing, color, VIDEO_DIGIT_SCALE)
    size = sprite.shape[0]
    frames = np.zeros((VIDEO_FRAMES, VIDEO_SIZE, VIDEO_SIZE, 3), dtype=np.uint8)
    for t, (row, col) in enumerate(motion_offsets(direction, start, cross)):
        frames[t, row:row + size, col:col + size] = sprite
    return frames


def photo_crop(photo: np.ndarray, top: int, left: int, side: int, flip: bool) -> np.ndarray:
    """uint8 [56, 56, 3]: a square crop of an RGB photo, resized (bicubic) and optionally mirrored."""
    crop = Image.fromarray(photo[top:top + side, left:left + side])
    crop = crop.resize((PHOTO_SIZE, PHOTO_SIZE), Image.Resampling.BICUBIC)
    if flip:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(crop, dtype=np.uint8)


def random_crop_box(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, bool]:
    """(top, left, side, flip) of a random square covering 60-95% of the shorter side."""
    side = int(rng.integers(int(0.6 * min(height, width)), int(0.95 * min(height, width)) + 1))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    return top, left, side, bool(rng.integers(0, 2))


# --------------------------------------------------------------------------- sources


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits: (drawings float64 [1797, 8, 8] in 0..16, targets int [1797])."""
    from sklearn.datasets import load_digits as sklearn_load_digits

    data = sklearn_load_digits()
    return np.asarray(data.images), np.asarray(data.target)


def load_photo(name: str) -> np.ndarray:
    """A scikit-image sample photo as uint8 [H, W, 3] (grey and binary images become RGB)."""
    import skimage.data

    photo = np.asarray(getattr(skimage.data, name)())
    if photo.dtype == bool:
        photo = photo.astype(np.uint8) * 255
    if photo.ndim == 2:
        photo = np.repeat(photo[:, :, None], 3, axis=2)
    return np.ascontiguousarray(photo[:, :, :3].astype(np.uint8))


# --------------------------------------------------------------------------- writing


class MediaWriter:
    """Writes PNGs and MP4s under a root directory and records every file written.

    `at(subdir)` gives a writer for a subdirectory that shares the record, so one list
    holds the training and every eval task's media.
    """

    def __init__(self, root: str, written: dict[str, list[str]] | None = None):
        self.root = root
        self.written = written if written is not None else {"image": [], "video": []}

    def at(self, subdir: str) -> MediaWriter:
        return MediaWriter(os.path.join(self.root, subdir), self.written)

    def image(self, relpath: str, pixels: np.ndarray) -> str:
        """Saves uint8 [H, W, 3] as PNG at root/relpath; returns relpath."""
        path = self._prepare(relpath, "image")
        # PIL writes no timestamp into PNGs, so the bytes depend on the pixels only.
        Image.fromarray(pixels).save(path, format="PNG", optimize=False, compress_level=9)
        return relpath

    def video(self, relpath: str, frames: np.ndarray, fps: int = VIDEO_FPS) -> str:
        """Saves uint8 [T, H, W, 3] as lossless H.264 MP4 at root/relpath; returns relpath.

        Two choices make the decoded frames a function of `frames` alone. The colour
        conversion is done here in numpy rather than by libswscale, and x264 runs
        lossless (qp 0), so every macroblock decodes to its input whatever motion search
        and mode decisions the encoder made. Those decisions were seen to vary from run
        to run even single-threaded, which made lossy encodes decode to different pixels.
        """
        import av

        path = self._prepare(relpath, "video")
        height, width = frames.shape[1:3]
        with av.open(path, "w", format="mp4") as container:
            options = {"qp": "0", "preset": "medium", "threads": "1",
                       "x264-params": "threads=1:lookahead-threads=1:sliced-threads=0"}
            stream = container.add_stream("libx264", rate=fps, options=options)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.codec_context.thread_count = 1
            for frame in frames:
                yuv = av.VideoFrame.from_ndarray(rgb_to_yuv420p(frame), format="yuv420p")
                for packet in stream.encode(yuv):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return relpath

    def _prepare(self, relpath: str, kind: str) -> str:
        path = os.path.join(self.root, relpath)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.written[kind].append(path)
        return path


def rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] RGB -> uint8 [H * 3 // 2, W] planar YUV 4:2:0 (Y, then U, then V).

    BT.601 limited range, the matrix decoders assume for untagged H.264, so decoding back
    to RGB gives the original colours up to rounding. Chroma is the mean of each 2x2
    block. H and W must be even.
    """
    height, width = rgb.shape[:2]
    if height % 2 or width % 2:
        raise ValueError(f"YUV 4:2:0 needs even frame sides, got {height}x{width}")
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    luma = 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0
    blue_diff = 128.0 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255.0
    red_diff = 128.0 + (112.0 * r - 93.786 * g - 18.214 * b) / 255.0

    def quarter(plane: np.ndarray) -> np.ndarray:
        return plane.reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3))

    planes = [luma, quarter(blue_diff), quarter(red_diff)]
    flat = np.concatenate([np.clip(np.rint(p), 0, 255).astype(np.uint8).ravel() for p in planes])
    # The layout PyAV reads for yuv420p: the three planes back to back, viewed as rows of W.
    return flat.reshape(height * 3 // 2, width)


def write_json_array(path: str, records: Sequence[dict]) -> int:
    """A JSON array with one record per line (diff-friendly); returns the record count."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n")
    return len(records)


def write_jsonl(path: str, records: Iterable[dict]) -> int:
    """One JSON object per line; returns the record count."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def named_rng(seed: int, name: str) -> np.random.Generator:
    """An independent random stream per purpose, so changing one part (e.g. `scale`) moves no other."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def random_motion(drawing: np.ndarray, color: Sequence[int], direction: str,
                   rng: np.random.Generator) -> np.ndarray:
    free = VIDEO_SIZE - 8 * VIDEO_DIGIT_SCALE
    start = int(rng.integers(0, free - (VIDEO_FRAMES - 1) * VIDEO_STEP + 1))
    cross = int(rng.integers(0, free + 1))
    return render_digit_video(drawing, color, direction, start, cross)
