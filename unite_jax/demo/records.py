"""The demo's records: captions, training manifests (UNITE and MMEB formats) and evaluation tasks.

Captions only use words the tiny BPE tokenizer (`unite_jax.data.tiny_tokenizer`) knows, so the
`tiny` random-init model can learn the tasks on a CPU in minutes. `unite_jax.demo.dataset` writes
the records these functions return.
"""

from __future__ import annotations

import numpy as np

from unite_jax.demo.render import (
    COLORS,
    DIGIT_NAMES,
    DIRECTIONS,
    PHOTOS,
    MediaWriter,
    named_rng,
    photo_crop,
    random_crop_box,
    random_motion,
    render_digit_image,
)

INSTRUCTION_T2I = "Find an image that matches the given caption."
INSTRUCTION_T2V = "Find a video that matches the given caption."
INSTRUCTION_FUSED = "Find an image and caption that match the given digit."
DIGIT_QUESTION = "What digit is in the picture?"
MOTION_QUESTION = "Which way does the digit move?"
PHOTO_QUESTION = "What is in the picture?"
MMEB_IMAGE_MARKER = "<|image_1|>"
MMEB_REPRESENT_IMAGE = "Represent the given image."
EVAL_TASKS = ("t2i_digits", "i2t_digits", "t2v_motion", "mmeb_digit_cls", "mmeb_motion_dir", "i2t_photos")
EVAL_CROPS_PER_PHOTO = 2  # eval crops per photo (different crops than training's)


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
                            random_motion(drawings[sample], COLORS[color], direction, rng))
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
                            random_motion(drawings[sample], COLORS[color], direction, rng))
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
