"""Training batches: exact prompt ids per modality mix, packing invariants, static shapes, bad input,
mixing and sharding, and mid-epoch state save / restore (in-process and with worker processes)."""

import json
import logging
import os
import re

import numpy as np
import pytest
from helpers import PROMPT_HEAD as HEAD
from helpers import prompt_tail as tail
from helpers import write_jsonl, write_video
from PIL import Image

from unite_jax.data import media
from unite_jax.data.packing import PackableInput, pack_batch, vision_rope_positions
from unite_jax.data.pipeline import (
    BatchSpec,
    DataError,
    build_train_iterator,
    default_data_config,
    prefetch_to_device,
    processor_overrides,
)
from unite_jax.model.pixels import normalize_stream

# Small pixel budget: a 112x112 image stays 112x112 (8x8 patches, 16 merged tokens), a 112x168 one
# gives 8x12 patches (24 tokens); a 4 s video at 2 fps keeps 4 frames (1 fps) = 2 temporal slices.
PROC = media.ProcessorConfig(min_pixels=16 * 28 * 28, max_pixels=64 * 28 * 28, video_min_frames=2,
                             video_max_frames=4)
SQUARE_TOKENS, WIDE_TOKENS, VIDEO_TOKENS = 16, 24, 32



def img(n):
    return "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>"


def vid(n):
    return "<|vision_start|>" + "<|video_pad|>" * n + "<|vision_end|>"


def _write_video(path, num_frames=8, fps=2, size=112):
    rng = np.random.default_rng(1)
    frames = np.stack([rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(num_frames)])
    write_video(path, frames, fps)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)).save(root / "square.png")
    Image.fromarray(rng.integers(0, 255, (112, 168, 3), dtype=np.uint8)).save(root / "wide.png")
    Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(root / "big.png")
    Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)).save(root / "photo.jpg", quality=90)
    data = (root / "photo.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[:len(data) // 2])
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(300))
    (root / "broken.mp4").write_bytes(rng.bytes(2000))
    _write_video(root / "clip.mp4")
    return root


def _config(train, **overrides):
    cfg = default_data_config()
    cfg.train = train
    cfg.seq_len, cfg.patches_per_row, cfg.vision_block = 128, 256, 128
    cfg.shuffle = False
    cfg.max_bad_fraction = 1.0
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def _spec(cfg, tokenizer, chunks=1, shards=1, rows=2, position_mode="sequential"):
    return BatchSpec.from_config(cfg, num_chunks=chunks, local_shards=shards, rows_per_shard=rows,
                                 pad_id=tokenizer.pad_id, patch_dim=PROC.patch_dim, position_mode=position_mode)


def _iterator(cfg, tokenizer, spec=None, **kwargs):
    kwargs.setdefault("process_index", 0)
    kwargs.setdefault("process_count", 1)
    return build_train_iterator(cfg, spec or _spec(cfg, tokenizer), tokenizer, PROC, seed=kwargs.pop("seed", 0),
                                **kwargs)


# --------------------------------------------------------------------------- prompts and layout

MIX_RECORDS = [
    {"query": {"text": "a photo of a cat"}, "candidate": {"image": "square.png"}},
    {"query": {"image": "wide.png"}, "candidate": {"text": "A dog runs"}},
    {"query": {"text": "<|IMAGE|> What is in the picture?", "image": "square.png"}, "candidate": {"video": "clip.mp4"}},
    {"query": {"video": ["clip.mp4"]}, "candidate": {"text": "<|VIDEO|> the digit moves left", "video": "clip.mp4"}},
    {"instruction": "Find an image that matches the given caption.", "query": {"text": "a red sofa"},
     "candidate": {"text": "a cat", "image": "wide.png"}, "negative": {"text": "a dog"}},
    {"qry": "<|image_1|>\nRepresent the given image.", "qry_image_path": "square.png", "pos_text": "the moon",
     "pos_image_path": "", "neg_text": "", "neg_image_path": "wide.png"},
]
# The literal UNITE prompts of MIX_RECORDS (query, candidate, negative or None), pads expanded.
MIX_PROMPTS = [
    (HEAD + "a photo of a cat" + tail("sentence"), HEAD + img(SQUARE_TOKENS) + tail("image"), None),
    (HEAD + img(WIDE_TOKENS) + tail("image"), HEAD + "A dog runs" + tail("sentence"), None),
    (HEAD + img(SQUARE_TOKENS) + " What is in the picture?" + tail("sentence and image"),
     HEAD + vid(VIDEO_TOKENS) + tail("video"), None),
    (HEAD + vid(VIDEO_TOKENS) + tail("video"),
     HEAD + vid(VIDEO_TOKENS) + " the digit moves left" + tail("sentence and video"), None),
    (HEAD + "Find an image that matches the given caption.\na red sofa" + tail("sentence"),
     HEAD + img(WIDE_TOKENS) + "a cat" + tail("sentence and image"), HEAD + "a dog" + tail("sentence")),
    (HEAD + img(SQUARE_TOKENS) + "\nRepresent the given image." + tail("sentence and image"),
     HEAD + "the moon" + tail("sentence"), HEAD + img(WIDE_TOKENS) + tail("image")),
]
MIX_MEDIA = [  # (query media, candidate media, negative media): (kind, file) in prompt order
    ([], [("image", "square.png")], []),
    ([("image", "wide.png")], [], []),
    ([("image", "square.png")], [("video", "clip.mp4")], []),
    ([("video", "clip.mp4")], [("video", "clip.mp4")], []),
    ([], [("image", "wide.png")], []),
    ([("image", "square.png")], [], [("image", "wide.png")]),
]


@pytest.fixture(scope="module")
def mix_batch(media_dir, tokenizer, tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("mix") / "mix.jsonl", MIX_RECORDS)
    cfg = _config(path, media_root=str(media_dir), hard_negatives=True)
    spec = _spec(cfg, tokenizer, chunks=2, shards=1, rows=3)
    with _iterator(cfg, tokenizer, spec) as it:
        return next(it), spec


def test_exact_prompt_ids_for_every_modality_mix(mix_batch, hf_tokenizer, tokenizer):
    batch, _ = mix_batch
    arrays = batch.arrays
    assert batch.num_examples == 6 and batch.bad_records == []
    # chunk c, shard 0, row r holds example c * 3 + r
    for n, prompts in enumerate(MIX_PROMPTS):
        c, row = divmod(n, 3)
        for stream, prompt in zip(("query", "candidate", "negative"), prompts):
            ids = arrays[stream]["input_ids"][c, row]
            mask = arrays[stream]["attention_mask"][c, row]
            if prompt is None:  # no negative: a lone <|endoftext|> row
                expected = [tokenizer.pad_id]
            else:
                expected = hf_tokenizer(prompt, add_special_tokens=False)["input_ids"]
            length = len(expected)
            np.testing.assert_array_equal(ids[-length:], expected, err_msg=f"example {n} {stream}")
            assert (ids[:-length] == tokenizer.pad_id).all() and mask.sum() == length and mask[-length:].all()
    np.testing.assert_array_equal(arrays["candidate_modality"], [[2, 1, 4], [5, 3, 1]])
    np.testing.assert_array_equal(arrays["negative_modality"], [[0, 0, 0], [0, 1, 2]])
    assert arrays["valid"].dtype == bool and arrays["valid"].all()
    expected_tokens = sum(len(hf_tokenizer(p, add_special_tokens=False)["input_ids"])
                          for prompts in MIX_PROMPTS for p in prompts if p is not None)
    assert batch.num_tokens == expected_tokens


@pytest.fixture(scope="module")
def mix_batch_float(media_dir, tokenizer, tmp_path_factory):
    """mix_batch with data.patch_dtype="float32": patches normalised on the host."""
    path = write_jsonl(tmp_path_factory.mktemp("mix_float") / "mix.jsonl", MIX_RECORDS)
    cfg = _config(path, media_root=str(media_dir), hard_negatives=True, patch_dtype="float32")
    spec = _spec(cfg, tokenizer, chunks=2, shards=1, rows=3)
    with _iterator(cfg, tokenizer, spec) as it:
        return next(it), spec


def _normalised(stream):
    """A batch stream's uint8 patch levels -> float32 patches, as the train step normalises them."""
    return np.asarray(normalize_stream(stream, media.normalize_table(PROC))["patches"])


def test_batch_shapes(mix_batch):
    batch, spec = mix_batch
    c, s, b, length, p = 2, 1, 3, spec.seq_len, spec.rows_per_shard * spec.patches_per_row
    for stream in ("query", "candidate", "negative"):
        got = {k: (v.shape, v.dtype) for k, v in batch.arrays[stream].items()}
        assert got == {"input_ids": ((c, s * b, length), np.int32), "attention_mask": ((c, s * b, length), np.int32),
                       "position_ids": ((c, s * b, 3, length), np.int32),
                       "patches": ((c, s, p, PROC.patch_dim), np.uint8), "patch_segment_ids": ((c, s, p), np.int32),
                       "patch_positions": ((c, s, p, 2), np.int32), "merged_dest": ((c, s, p // 4), np.int32)}
    assert sorted(batch.arrays) == ["candidate", "candidate_modality", "negative", "negative_modality", "query",
                                    "valid"]


def test_uint8_levels_normalise_to_the_float32_batch_bit_for_bit(mix_batch, mix_batch_float):
    """data.patch_dtype only moves where normalisation happens: the same batch, the same bits."""
    (levels, _), (floats, _) = mix_batch, mix_batch_float
    for stream in ("query", "candidate", "negative"):
        assert floats.arrays[stream]["patches"].dtype == np.float32
        assert floats.arrays[stream]["patches"].any()
        np.testing.assert_array_equal(_normalised(levels.arrays[stream]),
                                      floats.arrays[stream]["patches"])
        for key in ("input_ids", "patch_segment_ids", "merged_dest", "patch_positions"):
            np.testing.assert_array_equal(levels.arrays[stream][key], floats.arrays[stream][key])


def _media_patches(media_dir, kind, name):
    path = str(media_dir / name)
    return (media.preprocess_image(path, PROC) if kind == "image" else media.preprocess_video(path, PROC))


def test_every_merged_token_lands_in_its_own_pad_slot(mix_batch, media_dir, tokenizer):
    """Trace each example's patches: pad slot k of its media j receives patches 4k..4k+3 of that media."""
    batch, spec = mix_batch
    length, rows, block = spec.seq_len, spec.rows_per_shard, spec.vision_block
    pads = {"image": tokenizer.image_pad_id, "video": tokenizer.video_pad_id}
    normalised = {stream: _normalised(batch.arrays[stream]) for stream in ("query", "candidate", "negative")}
    for n, streams_media in enumerate(MIX_MEDIA):
        c, row = divmod(n, 3)
        for stream, media_list in zip(("query", "candidate", "negative"), streams_media):
            a = batch.arrays[stream]
            ids, dest = a["input_ids"][c].reshape(-1), a["merged_dest"][c, 0]
            np.testing.assert_array_equal(a["position_ids"][c, row], np.broadcast_to(np.arange(length), (3, length)))
            pad_slots = row * length + np.flatnonzero(np.isin(a["input_ids"][c, row], list(pads.values())))
            cursor = 0
            for kind, name in media_list:
                patches, grid = _media_patches(media_dir, kind, name)
                count = patches.shape[0] // 4
                slots = pad_slots[cursor:cursor + count]
                cursor += count
                assert (ids[slots] == pads[kind]).all()
                for k, slot in enumerate(slots):
                    where = np.flatnonzero(dest == slot)
                    assert len(where) == 1, (n, stream, k)
                    np.testing.assert_array_equal(normalised[stream][c, 0, 4 * where[0]:4 * where[0] + 4],
                                                  patches[4 * k:4 * k + 4])
                    # 2-D rotary indices of those patches: their (row, col) in the frame
                    _, h, w = (int(g) for g in grid)
                    frame_pos = vision_rope_positions([1, h, w])
                    k_in_frame = (4 * k) % (h * w)
                    np.testing.assert_array_equal(a["patch_positions"][c, 0, 4 * where[0]:4 * where[0] + 4],
                                                  frame_pos[k_in_frame:k_in_frame + 4])
            assert cursor == len(pad_slots)  # every pad slot of the row is fed
    # padding patches: segment -1, merged token sent to the dump slot; tiles never hold two rows
    for stream in ("query", "candidate", "negative"):
        a = batch.arrays[stream]
        for c in range(2):
            seg, dest = a["patch_segment_ids"][c, 0], a["merged_dest"][c, 0]
            merged_seg = seg[::4]
            assert ((dest == rows * length) == (merged_seg < 0)).all()
            for tile in range(seg.shape[0] // block):
                tile_dest = dest[tile * block // 4:(tile + 1) * block // 4]
                used = tile_dest[tile_dest < rows * length]
                assert len(set((used // length).tolist())) <= 1, f"tile {tile} of chunk {c} {stream} mixes rows"
            for segment in np.unique(seg[seg >= 0]):
                where = np.flatnonzero(seg == segment)
                assert (np.diff(where) == 1).all() and where[0] // block == where[-1] // block


def test_unshared_tiles_keep_every_row_within_its_budget():
    """share_tiles=False: rows never share a tile, so b rows of <= k tiles each always fit b*k tiles."""
    def item(sizes):
        ids, runs, patches, grids = [9], [], [], []
        for h, w in sizes:
            runs.append((len(ids), h * w // 4))
            ids += [5] * (h * w // 4)
            patches.append(np.zeros((h * w, 6), np.float32))
            grids.append((1, h, w))
        return PackableInput(np.asarray(ids + [0], np.int32), patches, grids, runs)

    # row 0: two 40-patch frames (two tiles of 64 on their own), row 1: one 24-patch frame
    items = [item([(4, 10), (4, 10)]), item([(4, 6)])]
    shared = pack_batch(items, num_shards=1, rows_per_shard=2, seq_len=64, patch_budget=192, pad_id=0, patch_dim=6,
                        vision_block=64)
    own = pack_batch(items, num_shards=1, rows_per_shard=2, seq_len=64, patch_budget=192, pad_id=0, patch_dim=6,
                     vision_block=64, share_tiles=False)
    # first fit over the shard puts row 1's frame next to row 0's first frame; per row it takes a third tile
    assert set(shared["patch_segment_ids"][0, :64].tolist()) == {0, 2}
    np.testing.assert_array_equal(own["patch_segment_ids"][0, :192:64], [0, 1, 2])
    assert set(own["patch_segment_ids"][0, 152:].tolist()) == {-1}
    # row 1 (8 tokens, left-padded to 64, pads from position 1): merged tokens 32..37 go to slots 64+56+1+k
    np.testing.assert_array_equal(own["merged_dest"][0, 32:38], 64 + 56 + 1 + np.arange(6))

# --------------------------------------------------------------------------- limits


def test_per_stream_patch_budgets(media_dir, tokenizer, tmp_path):
    """A text-only query stream carries no patches at all; a smaller candidate budget shrinks its buffer.
    Examples that need more than their stream's budget are dropped with the setting to change."""
    records = [
        {"query": {"text": "a photo of a cat"}, "candidate": {"image": "square.png"}},
        {"query": {"image": "wide.png"}, "candidate": {"text": "a dog"}},  # an image query: no room
        {"query": {"text": "two pictures"}, "candidate": {"image": ["square.png", "wide.png"]}},  # 2 tiles > 1
        {"query": {"text": "a red sofa"}, "candidate": {"text": "a sofa", "image": "wide.png"}},
    ]
    path = write_jsonl(tmp_path / "streams.jsonl", records)
    cfg = _config(path, media_root=str(media_dir), query_patches_per_row=0, candidate_patches_per_row=128)
    spec = _spec(cfg, tokenizer, rows=2)
    assert (spec.stream_patch_budget("query"), spec.stream_patch_budget("candidate")) == (0, 256)
    with _iterator(cfg, tokenizer, spec) as it:
        batch = next(it)
    query, candidate = batch.arrays["query"], batch.arrays["candidate"]
    assert query["patches"].shape == (1, 1, 0, PROC.patch_dim) and query["merged_dest"].shape == (1, 1, 0)
    assert query["patch_segment_ids"].shape == (1, 1, 0) and query["patch_positions"].shape == (1, 1, 0, 2)
    assert candidate["patches"].shape == (1, 1, 256, PROC.patch_dim)
    assert batch.example_wheres == [f"{path}:1", f"{path}:4"]
    reasons = dict(batch.bad_records)
    assert "data.query_patches_per_row=0 makes this stream text only" in reasons[f"{path}:2"]
    assert "need 2 vision tiles of 128, more than data.candidate_patches_per_row=128" in reasons[f"{path}:3"]
    # the candidate images are where the packer puts them with the full budget
    with _iterator(_config(path, media_root=str(media_dir)), tokenizer) as it:
        full = next(it)
    full_candidates = _normalised(full.arrays["candidate"])
    np.testing.assert_array_equal(_normalised(candidate)[0, 0, :64], full_candidates[0, 0, :64])


def test_stream_budgets_are_validated(tokenizer):
    for value in (100, -2, -1):  # -1 is not a sentinel: unset means data.patches_per_row
        cfg = _config("unused.jsonl", candidate_patches_per_row=value)
        with pytest.raises(ValueError, match=r"data.candidate_patches_per_row: expected None \(unset"):
            _spec(cfg, tokenizer)


def test_text_truncation_and_too_long_examples_keep_one_shape(media_dir, tokenizer, hf_tokenizer, tmp_path):
    long_text = "the quick brown fox jumps over the lazy dog " * 8
    records = [
        {"query": {"text": long_text}, "candidate": {"text": "a cat"}},
        {"query": {"text": "<|IMAGE|> " + long_text, "image": "square.png"}, "candidate": {"text": "a dog"}},
        {"query": {"text": "x"}, "candidate": {"image": "big.png"}},  # a 16x16-patch frame > vision_block 128
        {"query": {"text": "x"}, "candidate": {"image": ["wide.png"] * 3}},  # 3 tiles > 256 / 128
        {"query": {"video": ["clip.mp4", "clip.mp4"]}, "candidate": {"text": "y"}},  # 64 video tokens + template
        {"query": {"text": "a red sofa"}, "candidate": {"image": "wide.png"}},
    ]
    path = write_jsonl(tmp_path / "long.jsonl", records)
    cfg = _config(path, media_root=str(media_dir), seq_len=64, max_text_tokens=12)
    with _iterator(cfg, tokenizer, _spec(cfg, tokenizer, rows=3)) as it:
        first, second = next(it), next(it)
        stats = it.stats
    assert first.arrays["query"]["input_ids"].shape == second.arrays["query"]["input_ids"].shape == (1, 3, 64)
    assert stats["dropped"] == 6 and stats["by_reason"] == {"too long": 6}  # two passes
    assert second.bad_records == []  # reported the first time only
    reasons = dict(first.bad_records)
    assert "a frame of 256 patches exceeds data.vision_block=128" in reasons[f"{path}:3"]
    assert "288 patches need 3 vision tiles of 128, more than data.patches_per_row=256" in reasons[f"{path}:4"]
    assert "tokens after text truncation, more than data.seq_len=64" in reasons[f"{path}:5"]
    assert first.example_wheres[:2] == [f"{path}:1", f"{path}:2"]
    head = hf_tokenizer(HEAD, add_special_tokens=False)["input_ids"]
    for row, (_, modalities) in enumerate(((HEAD, "sentence"), (HEAD + img(SQUARE_TOKENS) + " ",
                                                                       "sentence and image"))):
        ids = first.arrays["query"]["input_ids"][0, row]
        ids = ids[first.arrays["query"]["attention_mask"][0, row] == 1]
        tail_ids = hf_tokenizer(tail(modalities), add_special_tokens=False)["input_ids"]
        np.testing.assert_array_equal(ids[-len(tail_ids):], tail_ids)  # the final <|endoftext|> survives
        assert ids[-1] == tokenizer.pad_id
        if row == 1:  # the vision block is whole
            assert (ids == tokenizer.image_pad_id).sum() == SQUARE_TOKENS
        text_ids = ids[len(head) + (SQUARE_TOKENS + 2 if row else 0):-len(tail_ids)]
        assert 0 < len(text_ids) <= 12
        text = hf_tokenizer.decode(text_ids)
        assert long_text.strip().startswith(text.strip()) and len(text) < len(long_text) / 3


# --------------------------------------------------------------------------- bad input


def _bad_manifest(path):
    good = [{"query": {"text": f"caption {i}"}, "candidate": {"image": "square.png"}} for i in range(8)]
    lines = [good[0],
             {"query": {"text": "x"}, "candidate": {"image": "absent.png"}},  # 2 missing file
             {"query": {"text": "x"}, "candidate": {"image": "corrupt.png"}},  # 3 corrupt image
             good[1],
             {"query": {"text": "x"}, "candidate": {"image": "truncated.jpg"}},  # 5 truncated image
             {"query": {"video": "broken.mp4"}, "candidate": {"text": "y"}},  # 6 unreadable video
             '{"query": {"text": "x"}, "candidate": ',  # 7 malformed JSON line
             good[2],
             {"query": {"text": "x", "audio": "a.wav"}, "candidate": {"text": "y"}},  # 9 unknown modality
             {},  # 10 empty record
             {"query": {"text": "<|IMAGE|> x"}, "candidate": {"text": "y"}},  # 11 placeholder without image
             *good[3:]]
    return write_jsonl(path, lines)


BAD_LINES = {2: "missing file", 3: "unreadable media", 5: "unreadable media", 6: "unreadable media",
             7: "malformed json", 9: "unknown modality", 10: "empty record", 11: "invalid record"}


def test_each_bad_input_is_skipped_counted_and_logged_once(media_dir, tokenizer, tmp_path, caplog):
    path = _bad_manifest(tmp_path / "bad.jsonl")
    cfg = _config(path, media_root=str(media_dir))
    caplog.set_level(logging.WARNING, logger="unite_jax.data.pipeline")
    with _iterator(cfg, tokenizer) as it:
        batches = [next(it) for _ in range(8)]  # two passes over the 8 good records
        stats = it.stats
    reported = [r for b in batches for r in b.bad_records]
    assert [w for w, _ in reported] == [f"{path}:{line}" for line in BAD_LINES]  # first pass only
    for (_, reason), (line, kind) in zip(reported, BAD_LINES.items()):
        assert reason.startswith(kind + ": "), (line, reason)
    reasons = dict(reported)
    assert f"{os.path.join(str(media_dir), 'absent.png')} not found" in reasons[f"{path}:2"]
    assert "corrupt.png: cannot read image" in reasons[f"{path}:3"]
    assert "truncated.jpg: cannot read image" in reasons[f"{path}:5"]
    assert "broken.mp4" in reasons[f"{path}:6"]
    assert "unknown modality key(s) ['audio']" in reasons[f"{path}:9"]
    assert "placeholder" in reasons[f"{path}:11"]
    assert stats["bad"] == 2 * len(BAD_LINES) and stats["records_seen"] == 2 * (8 + len(BAD_LINES))
    assert stats["examples"] == 16 and stats["dropped"] == 0
    assert stats["by_reason"] == {"missing file": 2, "unreadable media": 6, "malformed json": 2,
                                  "unknown modality": 2, "empty record": 2, "invalid record": 2}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sorted(warnings) == sorted(f"{w}: {r}" for w, r in reported)  # each once, although seen twice
    assert all(len(b.example_wheres) == 2 for b in batches)


def test_strict_mode_and_bad_fraction_abort(media_dir, tokenizer, tmp_path):
    path = _bad_manifest(tmp_path / "bad.jsonl")
    strict_error = (re.escape(f"{path}:2: missing file: candidate.image: ")
                    + r".*absent.png not found \(data.strict=True")
    with _iterator(_config(path, media_root=str(media_dir), strict=True), tokenizer) as it, \
            pytest.raises(DataError, match=strict_error):
        next(it)
    cfg = _config(path, media_root=str(media_dir), max_bad_fraction=0.3, bad_fraction_min_records=4)
    with _iterator(cfg, tokenizer) as it, pytest.raises(DataError) as info:
        for _ in range(4):
            next(it)
    # records 1-4 hold 2 bad, then every bad one pushes the fraction further past 0.3
    message = str(info.value)
    assert "training records skipped" in message and "data.max_bad_fraction=0.3" in message
    assert f"first: {path}:2: missing file" in message
    # nothing usable at all: stops after two passes even when every record may be skipped
    unusable = write_jsonl(tmp_path / "unusable.jsonl", ["{not json"] * 3)
    with _iterator(_config(unusable), tokenizer) as it, pytest.raises(DataError, match="no usable record in two "
                                                                                       "passes over .* 3 records"):
        next(it)


def test_hard_negative_policies(media_dir, tokenizer, tmp_path):
    records = [{"query": {"text": "a"}, "candidate": {"text": "b"}},
               {"query": {"text": "c"}, "candidate": {"text": "d"}, "negative": {"image": "gone.png"}},
               {"query": {"text": "e"}, "candidate": {"text": "f"}, "negative": {"image": "square.png"}}]
    path = write_jsonl(tmp_path / "neg.jsonl", records)
    # without hard negatives, a broken negative costs nothing
    with _iterator(_config(path, media_root=str(media_dir)), tokenizer) as it:
        assert next(it).example_wheres == [f"{path}:1", f"{path}:2"] and it.stats["bad"] == 0
    cfg = _config(path, media_root=str(media_dir), hard_negatives=True, missing_negative="drop")
    with _iterator(cfg, tokenizer) as it:
        batch = next(it)
        assert batch.example_wheres == [f"{path}:3", f"{path}:3"]  # the only usable record, in two passes
        np.testing.assert_array_equal(batch.arrays["negative_modality"], [[2, 2]])
        assert it.stats["by_reason"] == {"no negative": 2, "missing file": 2}
        assert it.stats["dropped"] == 2 and it.stats["bad"] == 2


# --------------------------------------------------------------------------- order, mixing, sharding, state


def _text_manifest(path, prefix, n):
    return write_jsonl(path, [{"query": {"text": f"{prefix} {i}"}, "candidate": {"text": f"c {i}"}}
                               for i in range(n)])


def test_process_shards_are_disjoint_and_cover_each_epoch(tokenizer, tmp_path):
    path = _text_manifest(tmp_path / "t.jsonl", "q", 24)
    cfg = _config(path, shuffle=True)
    shares = []  # per process: [epoch 0 examples, epoch 1 examples]
    for process in range(3):
        with _iterator(cfg, tokenizer, _spec(cfg, tokenizer, rows=4), process_index=process,
                       process_count=3, seed=5) as it:
            wheres = [w for _ in range(4) for w in next(it).example_wheres]
        shares.append((wheres[:8], wheres[8:]))
    everything = {f"{path}:{i}" for i in range(1, 25)}
    for epoch in range(2):
        parts = [set(share[epoch]) for share in shares]
        assert set.union(*parts) == everything
        assert sum(len(part) for part in parts) == 24  # disjoint, no repeats within an epoch
    assert [share[0] for share in shares] != [share[1] for share in shares]  # reshuffled per epoch


def test_process_batches_together_are_the_single_process_batch(tokenizer, tmp_path):
    """Step t's local batches of N processes hold exactly the examples one process reads at step t."""
    first = _text_manifest(tmp_path / "a.jsonl", "a", 20)
    second = _text_manifest(tmp_path / "b.jsonl", "b", 9)
    cfg = _config(f"{first}@2,{second}", shuffle=True)
    with _iterator(cfg, tokenizer, _spec(cfg, tokenizer, rows=6), process_index=0, process_count=1,
                   seed=3) as it:
        single = [sorted(next(it).example_wheres) for _ in range(5)]
    per_process = []
    for process in range(3):
        with _iterator(cfg, tokenizer, _spec(cfg, tokenizer, rows=2), process_index=process, process_count=3,
                       seed=3) as it:
            per_process.append([next(it).example_wheres for _ in range(5)])
    for step in range(5):
        assert sorted(w for batches in per_process for w in batches[step]) == single[step]


def test_weighted_mixing_and_same_source_batches(tokenizer, tmp_path):
    a = _text_manifest(tmp_path / "a.jsonl", "a", 10)
    b = str(tmp_path / "b.json")  # the second source is a JSON array
    with open(b, "w") as f:
        json.dump([{"query": {"text": f"b {i}"}, "candidate": {"text": f"c {i}"}} for i in range(10)], f)
    cfg = _config(f"{a}@3,{b}@1", shuffle=True)
    with _iterator(cfg, tokenizer, _spec(cfg, tokenizer, rows=4)) as it:
        wheres = [w for _ in range(5) for w in next(it).example_wheres]
    assert sum(w.startswith(a) for w in wheres) == 15 and sum(w.startswith(b) for w in wheres) == 5
    cfg.same_source_batches = True
    with _iterator(cfg, tokenizer, _spec(cfg, tokenizer, rows=4)) as it:
        batches = [next(it).example_wheres for _ in range(8)]
    sources = [{w.split(":")[0] for w in batch} for batch in batches]
    assert all(len(s) == 1 for s in sources)
    assert sum(s == {a} for s in sources) == 6 and sum(s == {b} for s in sources) == 2


def _assert_same_batches(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.example_wheres == w.example_wheres and g.bad_records == w.bad_records
        assert g.num_tokens == w.num_tokens
        for key, value in w.arrays.items():
            if isinstance(value, dict):
                for name, array in value.items():
                    np.testing.assert_array_equal(g.arrays[key][name], array, err_msg=f"{key}.{name}")
            else:
                np.testing.assert_array_equal(g.arrays[key], value, err_msg=key)


def test_state_restore_mid_epoch_in_a_fresh_iterator(media_dir, tokenizer, tmp_path):
    images = write_jsonl(tmp_path / "img.jsonl",
                          [{"query": {"text": f"photo {i}"}, "candidate": {"image": ["square.png", "wide.png"][i % 2]}}
                           for i in range(7)] + ['{"broken'])
    texts = _text_manifest(tmp_path / "txt.jsonl", "t", 9)
    cfg = _config(f"{images}@2,{texts}@1", media_root=str(media_dir), shuffle=True, same_source_batches=True)
    spec = _spec(cfg, tokenizer, shards=2, rows=1)
    with _iterator(cfg, tokenizer, spec, seed=3) as it:
        for _ in range(5):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        stats_at_save = it.stats
        want = [next(it) for _ in range(6)]
    assert state["pipeline"]["pending"], "the test should save while a same-source group is part-filled"
    with _iterator(cfg, tokenizer, spec, seed=3) as restored:
        restored.set_state(state)
        assert restored.stats == stats_at_save
        got = [next(restored) for _ in range(6)]
    _assert_same_batches(got, want)
    with _iterator(cfg, tokenizer, spec, seed=4) as other, pytest.raises(DataError, match="seed: saved 3, now 4"):
        other.set_state(state)


def test_prefetch_to_device_yields_the_state_of_each_consumed_batch(tokenizer, tmp_path):
    path = _text_manifest(tmp_path / "t.jsonl", "q", 6)
    cfg = _config(path, shuffle=True)
    with _iterator(cfg, tokenizer) as reference:
        expected = []
        for _ in range(4):
            batch = next(reference)
            expected.append((batch.example_wheres, reference.get_state()))
    with _iterator(cfg, tokenizer) as it:
        prefetcher = prefetch_to_device(it, lambda arrays: arrays["query"]["input_ids"].sum(), size=2)
        got = [next(prefetcher) for _ in range(4)]
        prefetcher.close()
    for (put, batch, state), (wheres, want_state) in zip(got, expected):
        assert batch.example_wheres == wheres and state == want_state
        assert put == batch.arrays["query"]["input_ids"].sum()
    # an error in the background thread reaches the consumer
    strict = _config(write_jsonl(tmp_path / "bad.jsonl", ["not json"] * 3), strict=True)
    with _iterator(strict, tokenizer) as it, prefetch_to_device(it, lambda arrays: arrays) as prefetcher, \
            pytest.raises(DataError, match=r"bad.jsonl:1: malformed json"):
        next(prefetcher)


# --------------------------------------------------------------------------- worker processes


def test_workers_restore_exactly_and_report_bad_records_to_the_main_process(media_dir, tokenizer, tmp_path):
    records = [{"query": {"text": f"photo {i}"}, "candidate": {"image": "square.png"}} for i in range(9)]
    records[4] = {"query": {"text": "x"}, "candidate": {"image": "absent.png"}}
    path = write_jsonl(tmp_path / "w.jsonl", records)
    cfg = _config(path, media_root=str(media_dir), shuffle=True, num_workers=2)
    spec = _spec(cfg, tokenizer, rows=2)
    with _iterator(cfg, tokenizer, spec) as it:
        seen = [next(it) for _ in range(3)]
        state = json.loads(json.dumps(it.get_state()))
        want = [next(it) for _ in range(4)]
        stats = it.stats
    assert stats["bad"] >= 1 and stats["by_reason"]["missing file"] == stats["bad"]
    assert any(where == f"{path}:5" for b in seen + want for where, _ in b.bad_records)
    with _iterator(cfg, tokenizer, spec) as restored:
        restored.set_state(state)
        got = [next(restored) for _ in range(4)]
    _assert_same_batches(got, want)


def test_a_worker_crash_surfaces_with_its_cause(tokenizer, tmp_path):
    path = _text_manifest(tmp_path / "t.jsonl", "q", 4)
    cfg = _config(path, num_workers=1)
    with _iterator(cfg, tokenizer) as it:
        os.remove(path)  # the worker opens the manifest lazily, after the index was built here
        with pytest.raises(DataError, match=r"t.jsonl: cannot open the manifest \(.*No such file"):
            next(it)


# --------------------------------------------------------------------------- config


def test_default_config_and_spec_checks(tokenizer):
    cfg = default_data_config()
    for key in ("train", "media_root", "strict", "max_bad_fraction", "num_workers", "worker_buffer_size", "shuffle",
                "same_source_batches", "hard_negatives", "max_text_tokens", "seq_len", "patches_per_row",
                "vision_block", "tfds_data_dir", "tfds_fields", "min_pixels", "max_pixels", "video_max_frames"):
        assert key in cfg, key
    assert (cfg.train, cfg.strict, cfg.max_bad_fraction, cfg.num_workers, cfg.max_text_tokens) == ("", False, 0.01, 0,
                                                                                                    2048)
    assert processor_overrides(cfg) == {}
    cfg.max_pixels, cfg.video_max_frames = 1000, 8
    assert processor_overrides(cfg) == {"max_pixels": 1000, "video_max_frames": 8}
    cfg.vision_block = 1000
    with pytest.raises(ValueError, match=r"data.vision_block \(1000\) must be a multiple of 4 and divide"):
        _spec(cfg, tokenizer)
    spec = BatchSpec.from_config(default_data_config(), num_chunks=2, local_shards=4, rows_per_shard=3, pad_id=0,
                                 patch_dim=1176)
    assert spec.local_batch_size == 24 and spec.patch_budget == 3 * 5120
    assert spec.max_text_tokens == 2048
    no_cap = BatchSpec(num_chunks=1, local_shards=1, rows_per_shard=1, seq_len=64, patches_per_row=64, vision_block=64,
                       hard_negatives=False, max_text_tokens=0, pad_id=0, patch_dim=1176)
    assert no_cap.max_text_tokens is None  # 0 from a config means no cap, not "cut all text"
