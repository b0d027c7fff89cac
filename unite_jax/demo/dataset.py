"""The demo dataset: digits, photos and moving-digit videos, built from data that ships with Python packages.

Everything is generated on the fly (nothing is downloaded or committed) from
  - scikit-learn's handwritten digits (1797 real 8x8 drawings, labels 0-9), drawn in
    red, green or blue on black, and animated moving left, right, up or down;
  - scikit-image's sample photos (astronaut, coffee, rocket, ...), as small square crops.
The captions use words the tiny BPE tokenizer (`unite_jax.data.tiny_tokenizer`) knows, so the `tiny`
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

import argparse
import json
import os
import time
from collections.abc import Sequence

import numpy as np

from unite_jax.demo.records import (
    EVAL_TASKS,
    chance_top1,
    make_eval_tasks,
    mmeb_records,
    shuffled,
    stage1_image_records,
    stage1_text_records,
    stage1_video_records,
    stage2_records,
)
from unite_jax.demo.render import (
    COLORS,
    PHOTOS,
    MediaWriter,
    load_digits,
    load_photo,
    named_rng,
    photo_crop,
    random_crop_box,
    random_motion,
    render_digit_image,
    write_json_array,
    write_jsonl,
)

# Training drawings per digit class at scale 1 (sklearn has 174-183 per class).
TRAIN_IMAGES_PER_CLASS = 30
TRAIN_RECOLORED_PER_CLASS = 10   # of those, drawn a second time in another colour (composed queries)
TRAIN_VIDEOS_PER_CLASS = 6       # each drawing animated in two directions
TRAIN_CROPS_PER_PHOTO = 4
MMEB_PER_CLASS = 10              # training images per digit that also get MMEB-format records
# Eval drawings per digit class, per task (fixed: eval does not change with `scale`).
EVAL_PER_CLASS = {"t2i_digits": 9, "i2t_digits": 6, "mmeb_digit_cls": 5, "t2v_motion": 8, "mmeb_motion_dir": 4}

STAGE1_FILES = (("stage1_images.json", 1.0), ("stage1_videos.jsonl", 0.5), ("stage1_text.json", 1.0))
STAGE2_FILES = ("stage2.jsonl", "stage2_mmeb.jsonl")


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
            frames = random_motion(drawings[sample], COLORS[color], direction, rng)
            paths[direction] = writer.video(f"media/videos/d{sample:04d}_{direction}.mp4", frames)
        videos.append({"sample": sample, "digit": digit, "paths": paths})
    for name, photo in photos.items():
        for k in range(crops_per_photo):
            top, left, side, flip = random_crop_box(*photo.shape[:2], rng)
            crops.append({"photo": name, "path": writer.image(
                f"media/photos/{name}_{k:02d}.png", photo_crop(photo, top, left, side, flip))})
    return {"images": images, "videos": videos, "photos": crops}


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


def main(argv: Sequence[str] | None = None) -> None:
    """`launch/make_demo_data.py`: builds the dataset and prints what it wrote."""
    parser = argparse.ArgumentParser(description="Builds the demo dataset (digits, photos, moving-digit videos).")
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the number of training records")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    summary = build_demo_data(args.out, seed=args.seed, scale=args.scale)
    for name, count in summary.items():
        if name.endswith((".json", ".jsonl")):
            print(f"{os.path.join(args.out, name)}: {count} records")
    print(f"media: {summary['media_images']} images, {summary['media_videos']} videos; "
          f"{summary['total_bytes'] / 1e6:.2f} MB in {time.perf_counter() - start:.1f} s")
    print(f"data.train (stage 1): {summary['train_stage1']}")
    print(f"data.train (stage 2): {summary['train_stage2']}")
