"""The demo dataset: deterministic, well-formed, captions true to the pixels, eval held out.

Captions are checked against the pixels themselves: every digit image is matched back
to the scikit-learn drawing it shows (nearest neighbour over all 1797 drawings, by cosine
similarity of its 8x8 block means), and every video's motion is measured from the ink's
centroid in the decoded frames.
"""

import hashlib
import json
import os
import re
import subprocess
import sys

import av
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from unite_jax.data import media
from unite_jax.demo.dataset import build_demo_data
from unite_jax.demo.render import MediaWriter, rgb_to_yuv420p

pytestmark = pytest.mark.slow  # builds the demo dataset (and once through its command line)

REPO = os.path.join(os.path.dirname(__file__), "..")
SCALE = 0.1
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# The dominant RGB channel of each colour word the captions use.
CHANNEL_OF_COLOR = {"red": 0, "green": 1, "blue": 2}
DIRECTION_WORDS = ("left", "right", "up", "down")
MODALITY_KEYS = ("text", "image", "video")
STAGE1 = ("stage1_images.json", "stage1_videos.jsonl", "stage1_text.json")
STAGE2 = ("stage2.jsonl",)
MMEB_KEYS = {"qry", "qry_image_path", "pos_text", "pos_image_path"}
TASKS = ("t2i_digits", "i2t_digits", "t2v_motion", "mmeb_digit_cls", "mmeb_motion_dir", "i2t_photos")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(out_dir, summary) of a small build made through the library."""
    out = str(tmp_path_factory.mktemp("demo_a"))
    return out, build_demo_data(out, seed=0, scale=SCALE)


@pytest.fixture(scope="module")
def built_by_cli(tmp_path_factory):
    """(out_dir, stdout) of the same build made through the command line, in another directory."""
    out = str(tmp_path_factory.mktemp("demo_b"))
    result = subprocess.run([sys.executable, os.path.join(REPO, "launch", "make_demo_data.py"), f"--out={out}",
                             "--seed=0", f"--scale={SCALE}"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return out, result.stdout


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    drawings = data.images.reshape(len(data.images), 64)
    return drawings / np.linalg.norm(drawings, axis=1, keepdims=True), data.images, data.target


# --------------------------------------------------------------------------- helpers


def read_records(path):
    """A JSON array file or a JSON-lines file -> list of dicts."""
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        records = json.load(f)
    assert isinstance(records, list), f"{path}: expected a JSON array"
    return records


def modality_of(side):
    """The MAMCL target-modality string of a query/candidate dict, computed from its keys."""
    return ",".join(key for key in MODALITY_KEYS if key in side)


def unite_sides(record):
    for name in ("query", "candidate", "negative"):
        if name in record:
            yield name, record[name]


def words(text):
    return re.findall(r"[a-z]+", text.lower())


def caption_digit_color(text):
    """(digit, colour) named by a caption; either may be None, never two of a kind."""
    found_digits = [NAMES.index(w) for w in words(text) if w in NAMES]
    found_colors = [w for w in words(text) if w in CHANNEL_OF_COLOR]
    assert len(found_digits) <= 1 and len(found_colors) <= 1, text
    return (found_digits or [None])[0], (found_colors or [None])[0]


def caption_direction(text):
    found = [w for w in words(text) if w in DIRECTION_WORDS]
    assert len(found) == 1, text
    return found[0]


def is_digit_image(path):
    return os.path.basename(path).startswith("d") and path.endswith(".png")


def recognise_digit_image(path, digits):
    """(sklearn index, colour word) of the drawing a 112x112 digit image shows."""
    unit, _, _ = digits
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    assert pixels.shape == (112, 112, 3), f"{path}: {pixels.shape}"
    blocks = pixels.reshape(8, 14, 8, 14, 3).mean(axis=(1, 3))
    channel = int(np.argmax(blocks.reshape(-1, 3).sum(axis=0)))
    drawing = blocks[:, :, channel].reshape(64)
    similarity = unit @ (drawing / np.linalg.norm(drawing))
    index = int(np.argmax(similarity))
    assert similarity[index] > 0.999, f"{path}: no sklearn drawing matches (best cosine {similarity[index]:.4f})"
    # Blocks must be flat: the drawing was upscaled by pixel repetition, not interpolated.
    assert np.ptp(pixels.reshape(8, 14, 8, 14, 3), axis=(1, 3)).max() == 0, path
    color = {v: k for k, v in CHANNEL_OF_COLOR.items()}[channel]
    return index, color


def decode_all(path):
    with av.open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])])


def measured_direction(frames):
    """Direction of the ink's centroid from the first to the last frame, and the distance travelled."""
    ink = frames.max(axis=-1).astype(np.float64)
    rows, cols = np.mgrid[:ink.shape[1], :ink.shape[2]]
    weights = ink.sum(axis=(1, 2))
    centroid_rows = (ink * rows).sum(axis=(1, 2)) / weights
    centroid_cols = (ink * cols).sum(axis=(1, 2)) / weights
    d_row, d_col = centroid_rows[-1] - centroid_rows[0], centroid_cols[-1] - centroid_cols[0]
    if abs(d_col) > abs(d_row):
        return ("right" if d_col > 0 else "left"), abs(d_col), abs(d_row)
    return ("down" if d_row > 0 else "up"), abs(d_row), abs(d_col)


def locate_drawing(frame, drawing):
    """Mean absolute error of the best placement of `drawing` (7x upscaled) in a decoded frame.

    Placements are searched within 3 pixels of the one that aligns the ink centroids. Ink
    outside the placed sprite counts as error too.
    """
    ink = frame.max(axis=-1).astype(np.float64)
    ink /= ink.max()
    sprite = np.kron(drawing / drawing.max(), np.ones((7, 7)))
    size = sprite.shape[0]

    def centroid(a):
        rows, cols = np.mgrid[:a.shape[0], :a.shape[1]]
        return np.array([(a * rows).sum(), (a * cols).sum()]) / a.sum()

    guess = np.rint(centroid(ink) - centroid(sprite)).astype(int)
    best = np.inf
    for d_row in range(-3, 4):
        for d_col in range(-3, 4):
            row, col = guess[0] + d_row, guess[1] + d_col
            if not (0 <= row <= ink.shape[0] - size and 0 <= col <= ink.shape[1] - size):
                continue
            canvas = np.zeros_like(ink)
            canvas[row:row + size, col:col + size] = sprite
            best = min(best, float(np.abs(canvas - ink).sum() / sprite.size))
    return best


def all_media_refs(out):
    """(absolute path, kind, record, file) of every medium a manifest or eval file references."""
    refs = []
    for name in STAGE1 + STAGE2:
        for record in read_records(os.path.join(out, name)):
            for _, side in unite_sides(record):
                for kind in ("image", "video"):
                    if kind in side:
                        refs.append((os.path.join(out, side[kind]), kind, record, name))
    for record in read_records(os.path.join(out, "stage2_mmeb.jsonl")):
        for key in ("qry_image_path", "pos_image_path"):
            if record[key]:
                refs.append((os.path.join(out, record[key]), "image", record, "stage2_mmeb.jsonl"))
    for task in TASKS:
        for kind_of_file in ("queries", "candidates"):
            name = f"eval/{task}/{kind_of_file}.jsonl"
            for record in read_records(os.path.join(out, name)):
                for kind in ("image", "video"):
                    if kind in record:
                        refs.append((os.path.join(out, "eval", task, record[kind]), kind, record, name))
    return refs


def all_files(out):
    return sorted(os.path.relpath(os.path.join(root, f), out) for root, _, files in os.walk(out) for f in files)


# --------------------------------------------------------------------------- tests


def test_same_seed_gives_identical_files(built, built_by_cli):
    (out_a, _), (out_b, _) = built, built_by_cli
    files = all_files(out_a)
    assert files == all_files(out_b)
    videos = [f for f in files if f.endswith(".mp4")]
    assert videos and any(f.endswith(".png") for f in files) and "manifest_summary.json" in files
    for name in files:
        with open(os.path.join(out_a, name), "rb") as fa, open(os.path.join(out_b, name), "rb") as fb:
            same_bytes = fa.read() == fb.read()
        if name.endswith(".mp4"):
            frames_a, frames_b = decode_all(os.path.join(out_a, name)), decode_all(os.path.join(out_b, name))
            assert frames_a.shape == frames_b.shape and np.array_equal(frames_a, frames_b), name
        else:
            assert same_bytes, name


def test_rgb_to_yuv420p_agrees_with_libswscale():
    """libswscale is the independent reference. Its chroma filter reaches across 2x2
    blocks, so chroma is compared on flat colour, where every filter agrees."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (30, 46, 3), dtype=np.uint8)
    ours = rgb_to_yuv420p(noise)
    theirs = av.VideoFrame.from_ndarray(noise, format="rgb24").reformat(format="yuv420p").to_ndarray()
    assert ours.shape == theirs.shape == (45, 46)
    assert np.abs(ours[:30].astype(int) - theirs[:30]).max() <= 1
    for colour in rng.integers(0, 256, (20, 3), dtype=np.uint8):
        flat = np.broadcast_to(colour, (6, 8, 3)).copy()
        theirs = av.VideoFrame.from_ndarray(flat, format="rgb24").reformat(format="yuv420p").to_ndarray()
        assert np.abs(rgb_to_yuv420p(flat).astype(int) - theirs).max() <= 1, colour
    with pytest.raises(ValueError, match="even"):
        rgb_to_yuv420p(noise[:29])


def test_videos_decode_to_exactly_what_was_encoded(tmp_path):
    """Lossless x264: the decoded YUV planes equal the encoder's input bit for bit, which
    is what makes demo videos reproducible whatever choices the encoder makes."""
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (5, 48, 64, 3), dtype=np.uint8)
    frames[:, :20] = 0
    MediaWriter(str(tmp_path)).video("clip.mp4", frames)
    with av.open(str(tmp_path / "clip.mp4")) as container:
        decoded = [f.to_ndarray(format="yuv420p") for f in container.decode(container.streams.video[0])]
    assert len(decoded) == len(frames)
    for got, frame in zip(decoded, frames):
        np.testing.assert_array_equal(got, rgb_to_yuv420p(frame))


def test_cli_prints_one_line_per_file(built_by_cli):
    out, stdout = built_by_cli
    with open(os.path.join(out, "manifest_summary.json")) as f:
        summary = json.load(f)
    manifest_names = [k for k in summary if k.endswith((".json", ".jsonl"))]
    for name in manifest_names:
        assert f"{os.path.join(out, name)}: {summary[name]} records" in stdout
    assert len(manifest_names) == 5 + 2 * len(TASKS)


def test_summary(built):
    out, summary = built
    # Hand count at scale 0.1: 3 drawings per digit (30 images) + 1 per digit recoloured (10);
    # 3 caption templates x 2 directions = 240 records; 13 photos x 1 crop x 2 captions x 2 = 52.
    assert summary["stage1_images.json"] == 240 + 52
    # 1 drawing per digit, 2 directions each: 20 videos x 2 captions x 2 directions.
    assert summary["stage1_videos.jsonl"] == 80
    for name in STAGE1 + STAGE2 + ("stage2_mmeb.jsonl",):
        assert summary[name] == len(read_records(os.path.join(out, name))), name
    assert summary["train_stage1"] == ",".join([os.path.join(out, "stage1_images.json"),
                                                os.path.join(out, "stage1_videos.jsonl") + "@0.5",
                                                os.path.join(out, "stage1_text.json")])
    assert summary["train_stage2"] == ",".join(os.path.join(out, n) for n in ("stage2.jsonl", "stage2_mmeb.jsonl"))
    assert sorted(summary["eval"]) == sorted(TASKS)
    for task, (queries, candidates) in summary["eval"].items():
        assert queries == os.path.join(out, "eval", task, "queries.jsonl")
        assert candidates == os.path.join(out, "eval", task, "candidates.jsonl")
        assert summary[f"eval/{task}/queries.jsonl"] == len(read_records(queries))
    # Random ranking: 3 of 90 images per caption; 1 of 30 captions; 2 of 80 videos; 1 of 10; 1 of 4; 1 of 13.
    assert summary["chance_top1"] == pytest.approx({"t2i_digits": 3 / 90, "i2t_digits": 1 / 30, "t2v_motion": 2 / 80,
                                                    "mmeb_digit_cls": 0.1, "mmeb_motion_dir": 0.25,
                                                    "i2t_photos": 1 / 13}, abs=1e-6)
    refs = {path for path, *_ in all_media_refs(out)}
    assert summary["media_images"] + summary["media_videos"] == len(refs)
    assert summary["total_bytes"] == sum(os.path.getsize(p) for p in refs) + sum(
        os.path.getsize(os.path.join(out, k)) for k in summary if k.endswith((".json", ".jsonl")))


def test_unite_manifests_have_the_documented_keys(built):
    out, _ = built
    kinds = set()
    for name in STAGE1 + STAGE2:
        records = read_records(os.path.join(out, name))
        assert records, name
        for i, record in enumerate(records):
            where = f"{name}[{i}]"
            allowed = {"query", "candidate", "target_modal", "negative"}
            if name in STAGE2:
                allowed.add("instruction")
            assert set(record) <= allowed and {"query", "candidate", "target_modal"} <= set(record), where
            for side_name, side in unite_sides(record):
                assert side and set(side) <= set(MODALITY_KEYS), f"{where}.{side_name}: {side}"
                assert all(isinstance(side[k], str) and side[k] for k in side), where
                text = side.get("text", "")
                # A fused side may mark where its medium goes (or leave it in front of the text).
                assert text.count("<|IMAGE|>") in ((0, 1) if "image" in side else (0,)), where
                assert text.count("<|VIDEO|>") in ((0, 1) if "video" in side else (0,)), where
            assert record["target_modal"] == modality_of(record["candidate"]), where
            if "instruction" in record:
                assert isinstance(record["instruction"], str) and record["instruction"].strip(), where
            kinds.add((name in STAGE2, "instruction" in record, modality_of(record["query"]), record["target_modal"]))
    # Stage 2 has instructions, fused text+image and text+video queries, and fused candidates.
    assert (True, True, "text", "image") in kinds and (True, True, "text", "video") in kinds
    assert (True, False, "text,image", "text") in kinds and (True, False, "text,image", "image") in kinds
    assert (True, False, "text,video", "text") in kinds and (True, False, "text,video", "video") in kinds
    assert (True, True, "text", "text,image") in kinds
    # Stage 1 covers both directions of image, video and text pairs.
    for pair in (("image", "text"), ("text", "image"), ("video", "text"), ("text", "video"), ("text", "text")):
        assert (False, False, *pair) in kinds, pair
    with open(os.path.join(out, "stage1_videos.jsonl")) as f:
        assert f.read(1) == "{"  # one object per line, not an array

    mmeb = read_records(os.path.join(out, "stage2_mmeb.jsonl"))
    assert mmeb
    for i, record in enumerate(mmeb):
        assert set(record) == MMEB_KEYS, f"stage2_mmeb.jsonl[{i}]"
        for text_key, path_key in (("qry", "qry_image_path"), ("pos_text", "pos_image_path")):
            assert record[text_key].count("<|image_1|>") == (1 if record[path_key] else 0), f"stage2_mmeb.jsonl[{i}]"


def test_every_referenced_file_opens(built):
    out, _ = built
    tiny = media.ProcessorConfig(min_pixels=16 * 28 * 28, max_pixels=256 * 28 * 28)
    checked = set()
    for path, kind, _, name in all_media_refs(out):
        if path in checked:
            continue
        checked.add(path)
        assert os.path.isfile(path), f"{name}: {path} missing"
        if kind == "image":
            with Image.open(path) as image:
                assert image.format == "PNG" and image.mode == "RGB", path
                assert image.size in ((112, 112), (56, 56)), (path, image.size)
            # Digits and photos both land on the tiny preset's smallest grid (8x8 patches).
            assert media.preprocess_image(path, tiny)[1].tolist() == [1, 8, 8], path
        else:
            # 8 frames at 8 fps = 1 s; sampled at 1 fps with at least 4 frames -> 4 frames, 2 temporal patches.
            frames = media.load_video(path)
            assert len(frames) == 4 and frames[0].shape == (112, 112, 3), path
            assert media.preprocess_video(frames, tiny)[1].tolist() == [2, 8, 8], path
    assert any(p.endswith(".mp4") for p in checked) and any(p.endswith(".png") for p in checked)


def test_eval_files(built):
    out, _ = built
    expected_query_keys = {"t2i_digits": {"text"}, "i2t_digits": {"image"}, "t2v_motion": {"text"},
                           "mmeb_digit_cls": {"text", "image"}, "mmeb_motion_dir": {"text", "video"},
                           "i2t_photos": {"image"}}
    for task in TASKS:
        queries = read_records(os.path.join(out, "eval", task, "queries.jsonl"))
        candidates = read_records(os.path.join(out, "eval", task, "candidates.jsonl"))
        candidate_ids = [c["id"] for c in candidates]
        assert len(set(candidate_ids)) == len(candidate_ids), task
        assert len({q["id"] for q in queries}) == len(queries) and 0 < len(queries) <= 100, task
        for c in candidates:
            assert isinstance(c["id"], str) and set(c) - {"id"} and set(c) - {"id"} <= set(MODALITY_KEYS), (task, c)
        for q in queries:
            assert set(q) - {"id", "positives", "candidates"} == expected_query_keys[task], (task, q)
            assert q["positives"] and set(q["positives"]) <= set(candidate_ids), (task, q["id"])
            if "candidates" in q:
                assert set(q["positives"]) <= set(q["candidates"]) <= set(candidate_ids), (task, q["id"])
        assert ("candidates" in queries[0]) == task.startswith("mmeb"), task


def test_image_captions_match_the_drawn_digit(built, digits):
    out, _ = built
    _, _, targets = digits
    seen = {}

    def recognise(path):
        if path not in seen:
            seen[path] = recognise_digit_image(path, digits)
        return seen[path]

    def shown(path):
        """(digit label, colour word) of the drawing in a digit image."""
        index, color = recognise(path)
        return int(targets[index]), color

    def check(path, text, where):
        index, color = recognise(path)
        digit, caption_color = caption_digit_color(text)
        assert digit == targets[index], f"{where}: {path} shows a {NAMES[targets[index]]}, caption {text!r}"
        assert caption_color in (None, color), f"{where}: {path} is {color}, caption {text!r}"

    checked = 0
    for name in ("stage1_images.json", "stage2.jsonl"):
        for i, record in enumerate(read_records(os.path.join(out, name))):
            sides = [record["query"], record["candidate"]]
            images = [s["image"] for s in sides if "image" in s and is_digit_image(s["image"])]
            texts = [s["text"] for s in sides if "text" in s and "the same digit" not in s["text"]]
            texts = [t for t in texts if caption_digit_color(t)[0] is not None]
            if len(images) == 1 and texts:
                check(os.path.join(out, images[0]), texts[0], f"{name}[{i}]")
                checked += 1
            if len(images) == 2:  # composed query: same drawing, the colour named in the query text
                (a, _), (b, b_color) = recognise(os.path.join(out, images[0])), recognise(os.path.join(out, images[1]))
                assert a == b and caption_digit_color(record["query"]["text"])[1] == b_color, f"{name}[{i}]"
    for i, record in enumerate(read_records(os.path.join(out, "stage2_mmeb.jsonl"))):
        for path_key, text in (("qry_image_path", record["pos_text"]), ("pos_image_path", record["qry"])):
            if is_digit_image(record[path_key]):
                check(os.path.join(out, record[path_key]), text, f"stage2_mmeb.jsonl[{i}]")
                checked += 1
    assert checked > 300

    # Eval: every positive matches its caption and every matching candidate is a positive.
    for task in ("t2i_digits", "i2t_digits", "mmeb_digit_cls"):
        task_dir = os.path.join(out, "eval", task)
        queries = read_records(os.path.join(task_dir, "queries.jsonl"))
        candidates = {c["id"]: c for c in read_records(os.path.join(task_dir, "candidates.jsonl"))}
        for q in queries:
            if "image" in q:
                digit, color = shown(os.path.join(task_dir, q["image"]))
                truth = {cid for cid in q.get("candidates", candidates)
                         if caption_digit_color(candidates[cid]["text"]) in ((digit, color), (digit, None))}
            else:
                truth = {cid for cid, c in candidates.items()
                         if shown(os.path.join(task_dir, c["image"])) == caption_digit_color(q["text"])}
            assert set(q["positives"]) == truth, (task, q["id"])


def test_videos_move_as_captioned(built, digits):
    out, _ = built
    _, drawings, targets = digits
    captions = {}
    for record in read_records(os.path.join(out, "stage1_videos.jsonl")):
        side, text_side = ((record["query"], record["candidate"]) if "video" in record["query"]
                           else (record["candidate"], record["query"]))
        captions.setdefault(os.path.join(out, side["video"]), set()).add(text_side["text"])
    task_dir = os.path.join(out, "eval", "t2v_motion")
    candidates = {c["id"]: os.path.join(task_dir, c["video"])
                  for c in read_records(os.path.join(task_dir, "candidates.jsonl"))}
    for q in read_records(os.path.join(task_dir, "queries.jsonl")):
        for cid in q["positives"]:
            captions.setdefault(candidates[cid], set()).add(q["text"])
    motion_dir = os.path.join(out, "eval", "mmeb_motion_dir")
    for q in read_records(os.path.join(motion_dir, "queries.jsonl")):
        captions.setdefault(os.path.join(motion_dir, q["video"]), set()).add(q["positives"][0])
    assert len(captions) == 20 + 80 + 40
    for path, texts in captions.items():
        frames = decode_all(path)
        assert frames.shape == (8, 112, 112, 3), path
        direction, travelled, drift = measured_direction(frames)
        assert 40 < travelled < 60 and drift < 3, (path, travelled, drift)
        for text in texts:
            assert caption_direction(text) == direction, (path, text, direction)
        # The file name carries the sklearn index; the pixels must show that drawing, and the
        # captions must name its label.
        index = int(re.match(r"d(\d{4})_", os.path.basename(path)).group(1))
        for frame in (frames[0], frames[-1]):
            assert locate_drawing(frame, drawings[index]) < 0.06, path
        for text in texts:
            digit, _ = caption_digit_color(text)
            assert digit in (None, targets[index]), (path, text)


def test_eval_media_are_held_out(built, digits):
    out, _ = built
    train, held_out = {}, {}
    for path, kind, _, name in all_media_refs(out):
        (held_out if name.startswith("eval/") else train)[os.path.realpath(path)] = kind
    assert train and held_out and not set(train) & set(held_out)

    def digest(path):
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    assert not {digest(p) for p in train} & {digest(p) for p in held_out}

    # No drawing shown in an eval image appears in any training image or video.
    def drawings_of(paths):
        out_indices = set()
        for path, kind in paths.items():
            if kind == "image" and is_digit_image(path):
                out_indices.add(recognise_digit_image(path, digits)[0])
            elif kind == "video":
                out_indices.add(int(re.match(r"d(\d{4})_", os.path.basename(path)).group(1)))
        return out_indices

    train_drawings, eval_drawings = drawings_of(train), drawings_of(held_out)
    assert len(eval_drawings) == 10 * (9 + 6 + 5 + 8 + 4)
    assert not train_drawings & eval_drawings
