"""The demo dataset: digits, photos and moving-digit videos, built from data that ships with Python packages.

Everything is generated on the fly (nothing is downloaded or committed) from
  - scikit-learn's handwritten digits (1797 real 8x8 drawings, labels 0-9), drawn in
    red, green or blue on black, and animated moving left, right, up or down;
  - scikit-image's sample photos (astronaut, coffee, rocket, ...), as small square crops.
The captions use words the tiny BPE tokenizer (`tiny_tokenizer`) knows, so the `tiny`
random-init model can learn the task on a CPU in minutes.

Output tree under `out_dir` (all paths inside manifests are relative to the file's directory):
    stage1_images.json      JSON array, image <-> caption pairs (both directions)
    stage1_videos.jsonl     JSON lines, video <-> caption pairs (both directions)
    stage1_text.json        JSON array, text <-> text paraphrases (with a "negative")
    stage2.jsonl            JSON lines, instruction and fused (text+image, text+video) queries
    stage2_mmeb.jsonl       JSON lines, MMEB-train keys: qry, qry_image_path, pos_text, pos_image_path
    media/images/dIIII_COLOR.png    digit images, 112x112 (IIII = index in sklearn's digits)
    media/photos/NAME_KK.png        photo crops, 56x56
    media/videos/dIIII_DIR.mp4      8 frames, 112x112, 8 fps, H.264
    eval/TASK/queries.jsonl, eval/TASK/candidates.jsonl, eval/TASK/media/...
    manifest_summary.json   the summary `build_demo_data` returns, paths relative to out_dir

Sizes are chosen for the `tiny` preset's pixel budget (min_pixels = 16*28*28 = 112*112):
a digit image is exactly 112x112, so every 14x14 vision patch covers one pixel of the 8x8
drawing. A video lasts one second; the default sampling (1 fps, at least 4 frames) keeps
4 of its 8 frames (0, 2, 5, 7), i.e. two temporal patches.

Eval media are separate files made from different digit drawings (and different crops of
the same 13 photos): no eval drawing is used in training. Same seed, same bytes.
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

INSTRUCTION_T2I = "Find an image that matches the given caption."
INSTRUCTION_T2V = "Find a video that matches the given caption."
INSTRUCTION_FUSED = "Find an image and caption that match the given digit."
DIGIT_QUESTION = "What digit is in the picture?"
MOTION_QUESTION = "Which way does the digit move?"
PHOTO_QUESTION = "What is in the picture?"
MMEB_IMAGE_MARKER = "<|image_1|>"
MMEB_REPRESENT_IMAGE = "Represent the given image."

# Training drawings per digit class at scale 1 (sklearn has 174-183 per class).
TRAIN_IMAGES_PER_CLASS = 30
TRAIN_RECOLORED_PER_CLASS = 10   # of those, drawn a second time in another colour (composed queries)
TRAIN_VIDEOS_PER_CLASS = 6       # each drawing animated in two directions
TRAIN_CROPS_PER_PHOTO = 4
MMEB_PER_CLASS = 10              # training images per digit that also get MMEB-format records
# Eval drawings per digit class, per task (fixed: eval does not change with `scale`).
EVAL_PER_CLASS = {"t2i_digits": 9, "i2t_digits": 6, "mmeb_digit_cls": 5, "t2v_motion": 8, "mmeb_motion_dir": 4}
EVAL_CROPS_PER_PHOTO = 2

STAGE1_FILES = (("stage1_images.json", 1.0), ("stage1_videos.jsonl", 0.5), ("stage1_text.json", 1.0))
STAGE2_FILES = ("stage2.jsonl", "stage2_mmeb.jsonl")
EVAL_TASKS = ("t2i_digits", "i2t_digits", "t2v_motion", "mmeb_digit_cls", "mmeb_motion_dir", "i2t_photos")


# --------------------------------------------------------------------------- captions


def digit_captions(digit: int, color: str) -> list[str]:
    """Caption templates of a coloured digit image; the first is the eval query's form."""
    name = DIGIT_NAMES[digit]
    return [f"the digit {name} in {color}", f"a {color} {name}", f"{name} in {color}"]


def motion_captions(digit: int, direction: str) -> list[str]:
    """Caption templates of a moving-digit video; the first is the eval query's form."""
    name = DIGIT_NAMES[digit]
    return [f"the digit {name} moves {direction}", f"{name} moves {direction}"]


def photo_captions(photo: str) -> list[str]:
    """Caption templates of a photo crop; the first is the eval candidate's form."""
    phrase = PHOTOS[photo]
    return [f"a photo of {phrase}", phrase]


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


def named_rng(seed: int, name: str) -> np.random.Generator:
    """An independent random stream per purpose, so changing one part (e.g. `scale`) moves no other."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def split_digit_samples(targets: np.ndarray, per_class: dict[str, int], seed: int) -> dict[str, list[int]]:
    """Disjoint, class-balanced sets of sample indices, one per name in `per_class`.

    Each class's indices are shuffled once (by `seed`) and handed out in `per_class`'s order,
    so a set depends only on the counts of the sets before it. Returns name -> indices
    ordered by class, then by shuffle position. Raises ValueError when a class runs out.
    """
    rng = named_rng(seed, "digit_split")
    shuffled = {d: rng.permutation(np.flatnonzero(targets == d)).tolist() for d in range(10)}
    taken = {d: 0 for d in range(10)}
    out: dict[str, list[int]] = {name: [] for name in per_class}
    for name, count in per_class.items():
        for d in range(10):
            if taken[d] + count > len(shuffled[d]):
                raise ValueError(f"split_digit_samples: set {name!r} needs {count} drawings of digit {d}, "
                                 f"only {len(shuffled[d]) - taken[d]} left (lower `scale`)")
            out[name].extend(shuffled[d][taken[d]:taken[d] + count])
            taken[d] += count
    return out


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


def pair(query: dict, candidate: dict, target_modal: str, **extra) -> dict:
    """A UNITE training record."""
    return {**extra, "query": query, "candidate": candidate, "target_modal": target_modal}


def both_ways(text: str, media_key: str, media_path: str) -> list[dict]:
    """media -> text and text -> media records of one caption."""
    return [pair({media_key: media_path}, {"text": text}, "text"),
            pair({"text": text}, {media_key: media_path}, media_key)]


def shuffled(records: list[dict], seed: int, name: str) -> list[dict]:
    """The records in a seeded random order (readers that stream a file see a mix)."""
    order = named_rng(seed, name).permutation(len(records))
    return [records[i] for i in order]


# --------------------------------------------------------------------------- training media


def _count(base: int, scale: float, minimum: int = 1) -> int:
    return max(minimum, round(base * scale))


def make_training_media(writer: MediaWriter, drawings: np.ndarray, targets: np.ndarray,
                        splits: dict[str, list[int]], photos: dict[str, np.ndarray], seed: int,
                        crops_per_photo: int, recolored_per_class: int) -> dict[str, list[dict]]:
    """Renders and writes the training media; returns descriptions of what was written.

    Returns {"images": [{path, digit, color, sample, recolored_path?, recolor?}],
             "videos": [{paths: {direction: path}, digit, sample}],
             "photos": [{path, photo}]}.
    """
    rng = named_rng(seed, "train_media")
    color_names = list(COLORS)
    images, videos, crops = [], [], []
    per_class_seen = {d: 0 for d in range(10)}
    for sample in splits["train_images"]:
        digit = int(targets[sample])
        # Colours rotate within a class so every (digit, colour) is equally common.
        k = per_class_seen[digit]
        per_class_seen[digit] += 1
        color = color_names[(k + digit) % len(color_names)]
        entry = {"sample": sample, "digit": digit, "color": color,
                 "path": writer.image(f"media/images/d{sample:04d}_{color}.png",
                                      render_digit_image(drawings[sample], COLORS[color]))}
        if k < recolored_per_class:
            other = color_names[(color_names.index(color) + 1 + int(rng.integers(0, 2))) % len(color_names)]
            entry["recolor"] = other
            entry["recolored_path"] = writer.image(f"media/images/d{sample:04d}_{other}.png",
                                                   render_digit_image(drawings[sample], COLORS[other]))
        images.append(entry)
    for sample in splits["train_videos"]:
        digit = int(targets[sample])
        horizontal = ("left", "right")[int(rng.integers(0, 2))]
        vertical = ("up", "down")[int(rng.integers(0, 2))]
        color = color_names[int(rng.integers(0, len(color_names)))]
        paths = {}
        for direction in (horizontal, vertical):
            frames = _random_motion(drawings[sample], COLORS[color], direction, rng)
            paths[direction] = writer.video(f"media/videos/d{sample:04d}_{direction}.mp4", frames)
        videos.append({"sample": sample, "digit": digit, "paths": paths})
    for name, photo in photos.items():
        for k in range(crops_per_photo):
            top, left, side, flip = random_crop_box(*photo.shape[:2], rng)
            crops.append({"photo": name, "path": writer.image(
                f"media/photos/{name}_{k:02d}.png", photo_crop(photo, top, left, side, flip))})
    return {"images": images, "videos": videos, "photos": crops}


def _random_motion(drawing: np.ndarray, color: Sequence[int], direction: str,
                   rng: np.random.Generator) -> np.ndarray:
    free = VIDEO_SIZE - 8 * VIDEO_DIGIT_SCALE
    start = int(rng.integers(0, free - (VIDEO_FRAMES - 1) * VIDEO_STEP + 1))
    cross = int(rng.integers(0, free + 1))
    return render_digit_video(drawing, color, direction, start, cross)


# --------------------------------------------------------------------------- manifests


def stage1_image_records(media: dict[str, list[dict]]) -> list[dict]:
    """Image <-> caption pairs of every training digit image (all colours) and photo crop."""
    records = []
    for entry in media["images"]:
        colored = [(entry["color"], entry["path"])]
        if "recolor" in entry:
            colored.append((entry["recolor"], entry["recolored_path"]))
        for color, path in colored:
            for caption in digit_captions(entry["digit"], color):
                records += both_ways(caption, "image", path)
    for crop in media["photos"]:
        for caption in photo_captions(crop["photo"]):
            records += both_ways(caption, "image", crop["path"])
    return records


def stage1_video_records(media: dict[str, list[dict]]) -> list[dict]:
    """Video <-> caption pairs of every training video."""
    records = []
    for entry in media["videos"]:
        for direction, path in entry["paths"].items():
            for caption in motion_captions(entry["digit"], direction):
                records += both_ways(caption, "video", path)
    return records


def stage1_text_records() -> list[dict]:
    """Paraphrase pairs (both directions), each with a negative that differs in one word."""
    groups = []  # (phrase, paraphrase, negative phrase)
    for digit, name in enumerate(DIGIT_NAMES):
        other = DIGIT_NAMES[(digit + 1) % 10]
        groups.append((name, f"the digit {name}", f"the digit {other}"))
        for color in COLORS:
            first, second, _ = digit_captions(digit, color)
            groups.append((second, first, digit_captions((digit + 1) % 10, color)[0]))
        for direction in DIRECTIONS:
            first, second = motion_captions(digit, direction)
            groups.append((second, first, motion_captions((digit + 3) % 10, direction)[0]))
    photo_names = list(PHOTOS)
    for k, photo in enumerate(photo_names):
        first, second = photo_captions(photo)
        groups.append((second, first, photo_captions(photo_names[(k + 1) % len(photo_names)])[0]))
    records = []
    for phrase, paraphrase, negative in groups:
        records.append(pair({"text": phrase}, {"text": paraphrase}, "text", negative={"text": negative}))
        records.append(pair({"text": paraphrase}, {"text": phrase}, "text", negative={"text": negative}))
    return records


def stage2_records(media: dict[str, list[dict]]) -> list[dict]:
    """Instruction-style and fused-query records (UNITE format, some with an "instruction" key)."""
    records = []
    for entry in media["images"]:
        digit, color, path = entry["digit"], entry["color"], entry["path"]
        name = DIGIT_NAMES[digit]
        caption = digit_captions(digit, color)[0]
        records.append(pair({"text": caption}, {"image": path}, "image", instruction=INSTRUCTION_T2I))
        records.append(pair({"text": f"<|IMAGE|>\n{DIGIT_QUESTION}", "image": path}, {"text": name}, "text"))
        records.append(pair({"text": f"{name} in {color}"}, {"text": caption, "image": path}, "text,image",
                            instruction=INSTRUCTION_FUSED))
        if "recolor" in entry:
            # Composed image retrieval: the same drawing in another colour, both ways.
            other_path = entry["recolored_path"]
            records.append(pair({"text": f"<|IMAGE|>\nthe same digit in {entry['recolor']}", "image": path},
                                {"image": other_path}, "image"))
            records.append(pair({"text": f"<|IMAGE|>\nthe same digit in {color}", "image": other_path},
                                {"image": path}, "image"))
    for entry in media["videos"]:
        digit = entry["digit"]
        directions = list(entry["paths"])
        for k, direction in enumerate(directions):
            path = entry["paths"][direction]
            records.append(pair({"text": f"<|VIDEO|> {MOTION_QUESTION}", "video": path}, {"text": direction},
                                "text"))
            records.append(pair({"text": motion_captions(digit, direction)[0]}, {"video": path}, "video",
                                instruction=INSTRUCTION_T2V))
            # Composed video retrieval: the same drawing moving the other way.
            other = directions[1 - k]
            records.append(pair({"text": f"<|VIDEO|>\nthe same digit moves {other}", "video": path},
                                {"video": entry["paths"][other]}, "video"))
    for crop in media["photos"]:
        records.append(pair({"text": f"<|IMAGE|>\n{PHOTO_QUESTION}", "image": crop["path"]},
                            {"text": PHOTOS[crop["photo"]]}, "text"))
    return records


def mmeb_records(media: dict[str, list[dict]], per_class: int) -> list[dict]:
    """MMEB-train style records (qry, qry_image_path, pos_text, pos_image_path; "" = no image)."""
    records = []
    seen = {d: 0 for d in range(10)}
    for entry in media["images"]:
        digit = entry["digit"]
        if seen[digit] >= per_class:
            continue
        seen[digit] += 1
        records.append({"qry": f"{MMEB_IMAGE_MARKER}\n{DIGIT_QUESTION}", "qry_image_path": entry["path"],
                        "pos_text": DIGIT_NAMES[digit], "pos_image_path": ""})
        records.append({"qry": f"{INSTRUCTION_T2I}\n{digit_captions(digit, entry['color'])[0]}",
                        "qry_image_path": "", "pos_text": f"{MMEB_IMAGE_MARKER}\n{MMEB_REPRESENT_IMAGE}",
                        "pos_image_path": entry["path"]})
    for crop in media["photos"]:
        records.append({"qry": f"{MMEB_IMAGE_MARKER}\n{PHOTO_QUESTION}", "qry_image_path": crop["path"],
                        "pos_text": PHOTOS[crop["photo"]], "pos_image_path": ""})
    return records


# --------------------------------------------------------------------------- eval


def _ids(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{k:04d}" for k in range(count)]


def eval_t2i_digits(writer: MediaWriter, drawings, targets, samples: list[int]):
    """Caption -> image: one query per (digit, colour), positives = all its images."""
    color_names = list(COLORS)
    candidates, by_caption = [], {}
    for k, sample in enumerate(samples):
        digit = int(targets[sample])
        color = color_names[k % len(color_names)]
        cid = f"c{k:04d}"
        path = writer.image(f"media/d{sample:04d}_{color}.png", render_digit_image(drawings[sample], COLORS[color]))
        candidates.append({"id": cid, "image": path})
        by_caption.setdefault(digit_captions(digit, color)[0], []).append(cid)
    queries = [{"id": qid, "text": caption, "positives": positives}
               for qid, (caption, positives) in zip(_ids("q", len(by_caption)), by_caption.items())]
    return queries, candidates


def eval_i2t_digits(writer: MediaWriter, drawings, targets, samples: list[int]):
    """Image -> caption among all 30 "the digit NAME in COLOR" captions."""
    captions = [digit_captions(d, c)[0] for d in range(10) for c in COLORS]
    candidates = [{"id": cid, "text": text} for cid, text in zip(_ids("c", len(captions)), captions)]
    color_names = list(COLORS)
    queries = []
    for k, sample in enumerate(samples):
        digit = int(targets[sample])
        color = color_names[k % len(color_names)]
        path = writer.image(f"media/d{sample:04d}_{color}.png", render_digit_image(drawings[sample], COLORS[color]))
        target = candidates[captions.index(digit_captions(digit, color)[0])]["id"]
        queries.append({"id": f"q{k:04d}", "image": path, "positives": [target]})
    return queries, candidates


def eval_t2v_motion(writer: MediaWriter, drawings, targets, samples: list[int], rng: np.random.Generator):
    """Caption -> video: one query per (digit, direction), positives = all its videos."""
    directions = list(DIRECTIONS)
    color_names = list(COLORS)
    candidates, by_caption = [], {}
    for k, sample in enumerate(samples):
        digit = int(targets[sample])
        direction = directions[k % len(directions)]
        color = color_names[int(rng.integers(0, len(color_names)))]
        cid = f"c{k:04d}"
        path = writer.video(f"media/d{sample:04d}_{direction}.mp4",
                            _random_motion(drawings[sample], COLORS[color], direction, rng))
        candidates.append({"id": cid, "video": path})
        by_caption.setdefault(motion_captions(digit, direction)[0], []).append(cid)
    queries = [{"id": qid, "text": caption, "positives": positives}
               for qid, (caption, positives) in zip(_ids("q", len(by_caption)), by_caption.items())]
    return queries, candidates


def eval_mmeb_digit_cls(writer: MediaWriter, drawings, targets, samples: list[int]):
    """MMEB-style classification: image + question, ranked among the 10 digit names."""
    candidates = [{"id": name, "text": name} for name in DIGIT_NAMES]
    color_names = list(COLORS)
    queries = []
    for k, sample in enumerate(samples):
        digit = int(targets[sample])
        color = color_names[k % len(color_names)]
        path = writer.image(f"media/d{sample:04d}_{color}.png", render_digit_image(drawings[sample], COLORS[color]))
        queries.append({"id": f"q{k:04d}", "text": f"<|IMAGE|>\n{DIGIT_QUESTION}", "image": path,
                        "positives": [DIGIT_NAMES[digit]], "candidates": list(DIGIT_NAMES)})
    return queries, candidates


def eval_mmeb_motion_dir(writer: MediaWriter, drawings, targets, samples: list[int], rng: np.random.Generator):
    """MMEB-style: video + question, ranked among the 4 direction words."""
    directions = list(DIRECTIONS)
    color_names = list(COLORS)
    candidates = [{"id": direction, "text": direction} for direction in directions]
    queries = []
    for k, sample in enumerate(samples):
        direction = directions[k % len(directions)]
        color = color_names[int(rng.integers(0, len(color_names)))]
        path = writer.video(f"media/d{sample:04d}_{direction}.mp4",
                            _random_motion(drawings[sample], COLORS[color], direction, rng))
        queries.append({"id": f"q{k:04d}", "text": f"<|VIDEO|> {MOTION_QUESTION}", "video": path,
                        "positives": [direction], "candidates": list(directions)})
    return queries, candidates


def eval_i2t_photos(writer: MediaWriter, photos: dict[str, np.ndarray], rng: np.random.Generator,
                    crops_per_photo: int):
    """Photo crop -> caption among the 13 "a photo of ..." captions (crops unseen in training)."""
    names = list(photos)
    candidates = [{"id": f"c{k:04d}", "text": photo_captions(name)[0]} for k, name in enumerate(names)]
    queries = []
    for name_index, name in enumerate(names):
        photo = photos[name]
        for k in range(crops_per_photo):
            top, left, side, flip = random_crop_box(*photo.shape[:2], rng)
            path = writer.image(f"media/{name}_{k:02d}.png", photo_crop(photo, top, left, side, flip))
            queries.append({"id": f"q{len(queries):04d}", "image": path,
                            "positives": [candidates[name_index]["id"]]})
    return queries, candidates


def chance_top1(queries: list[dict], candidates: list[dict]) -> float:
    """Probability that a random ranking puts a positive first, averaged over queries."""
    all_ids = [c["id"] for c in candidates]
    total = 0.0
    for query in queries:
        pool = query.get("candidates", all_ids)
        total += len(set(query["positives"]) & set(pool)) / len(pool)
    return total / len(queries)


def make_eval_tasks(writer: MediaWriter, drawings, targets, splits: dict[str, list[int]],
                    photos: dict[str, np.ndarray], seed: int) -> dict[str, tuple[list[dict], list[dict]]]:
    """Writes every eval task's media under eval/TASK/media; returns task -> (queries, candidates)."""
    return {
        "t2i_digits": eval_t2i_digits(writer.at("eval/t2i_digits"), drawings, targets, splits["t2i_digits"]),
        "i2t_digits": eval_i2t_digits(writer.at("eval/i2t_digits"), drawings, targets, splits["i2t_digits"]),
        "t2v_motion": eval_t2v_motion(writer.at("eval/t2v_motion"), drawings, targets, splits["t2v_motion"],
                                      named_rng(seed, "eval_t2v_motion")),
        "mmeb_digit_cls": eval_mmeb_digit_cls(writer.at("eval/mmeb_digit_cls"), drawings, targets,
                                              splits["mmeb_digit_cls"]),
        "mmeb_motion_dir": eval_mmeb_motion_dir(writer.at("eval/mmeb_motion_dir"), drawings, targets,
                                                splits["mmeb_motion_dir"], named_rng(seed, "eval_motion_dir")),
        "i2t_photos": eval_i2t_photos(writer.at("eval/i2t_photos"), photos, named_rng(seed, "eval_photos"),
                                      EVAL_CROPS_PER_PHOTO),
    }


# --------------------------------------------------------------------------- entry point


def build_demo_data(out_dir: str, *, seed: int = 0, scale: float = 1.0) -> dict:
    """Writes the demo dataset into `out_dir` (see the module docstring) and returns its summary.

    The same seed (and scale) gives byte-identical manifests and PNGs, and MP4s that decode
    to identical frames. Existing files of the same names are overwritten; nothing else is
    deleted (files left by an earlier run with a larger `scale` stay, unreferenced).

    `scale` multiplies the number of training drawings, videos and photo crops (hence the
    training records); the eval sets do not depend on it.

    Returns
      {"stage1_images.json": records, ..., "eval/TASK/queries.jsonl": records, ...,
       "media_images": int, "media_videos": int, "total_bytes": int,
       "train_stage1": "OUT/stage1_images.json,OUT/stage1_videos.jsonl@0.5,OUT/stage1_text.json",
       "train_stage2": "OUT/stage2.jsonl,OUT/stage2_mmeb.jsonl",
       "eval": {task: (queries_path, candidates_path)},
       "chance_top1": {task: probability that a random ranking puts a positive first}}
    with paths joined onto `out_dir` as given. `out_dir/manifest_summary.json` holds the same
    with paths relative to out_dir (so the file does not depend on where out_dir is).
    """
    if not scale > 0:
        raise ValueError(f"build_demo_data: scale must be positive, got {scale!r}")
    drawings, targets = load_digits()
    photos = {name: load_photo(name) for name in PHOTOS}
    # Eval sets are taken first so they do not move when `scale` changes the training sets.
    per_class = dict(EVAL_PER_CLASS)
    per_class["train_images"] = _count(TRAIN_IMAGES_PER_CLASS, scale)
    per_class["train_videos"] = _count(TRAIN_VIDEOS_PER_CLASS, scale)
    splits = split_digit_samples(targets, per_class, seed)

    os.makedirs(out_dir, exist_ok=True)
    writer = MediaWriter(out_dir)
    media = make_training_media(writer, drawings, targets, splits, photos, seed,
                                crops_per_photo=_count(TRAIN_CROPS_PER_PHOTO, scale),
                                recolored_per_class=min(per_class["train_images"],
                                                        _count(TRAIN_RECOLORED_PER_CLASS, scale, 0)))
    counts: dict[str, int] = {}
    counts["stage1_images.json"] = write_json_array(
        os.path.join(out_dir, "stage1_images.json"), shuffled(stage1_image_records(media), seed, "stage1_images"))
    counts["stage1_videos.jsonl"] = write_jsonl(
        os.path.join(out_dir, "stage1_videos.jsonl"), shuffled(stage1_video_records(media), seed, "stage1_videos"))
    counts["stage1_text.json"] = write_json_array(
        os.path.join(out_dir, "stage1_text.json"), shuffled(stage1_text_records(), seed, "stage1_text"))
    counts["stage2.jsonl"] = write_jsonl(
        os.path.join(out_dir, "stage2.jsonl"), shuffled(stage2_records(media), seed, "stage2"))
    counts["stage2_mmeb.jsonl"] = write_jsonl(
        os.path.join(out_dir, "stage2_mmeb.jsonl"),
        shuffled(mmeb_records(media, per_class=_count(MMEB_PER_CLASS, scale)), seed, "stage2_mmeb"))

    tasks = make_eval_tasks(writer, drawings, targets, splits, photos, seed)
    eval_files, chance = {}, {}
    for task in EVAL_TASKS:
        queries, candidates = tasks[task]
        files = (f"eval/{task}/queries.jsonl", f"eval/{task}/candidates.jsonl")
        counts[files[0]] = write_jsonl(os.path.join(out_dir, files[0]), queries)
        counts[files[1]] = write_jsonl(os.path.join(out_dir, files[1]), candidates)
        eval_files[task] = files
        chance[task] = round(chance_top1(queries, candidates), 6)

    media_paths = writer.written["image"] + writer.written["video"]
    total_bytes = sum(os.path.getsize(p) for p in media_paths)
    total_bytes += sum(os.path.getsize(os.path.join(out_dir, name)) for name in counts)

    def summary(join) -> dict:
        return {
            **counts,
            "media_images": len(writer.written["image"]),
            "media_videos": len(writer.written["video"]),
            "total_bytes": total_bytes,
            "train_stage1": ",".join(join(name) + ("" if weight == 1.0 else f"@{weight:g}")
                                     for name, weight in STAGE1_FILES),
            "train_stage2": ",".join(join(name) for name in STAGE2_FILES),
            "eval": {task: (join(q), join(c)) for task, (q, c) in eval_files.items()},
            "chance_top1": chance,
        }

    with open(os.path.join(out_dir, "manifest_summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary(lambda name: name), f, indent=2)
        f.write("\n")
    return summary(lambda name: os.path.join(out_dir, name))
