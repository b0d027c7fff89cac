"""Image / video pre-processing: parity with transformers' Qwen2-VL image processor,
an explicit-loop reference for the video patch layout, frame sampling, and bad inputs."""

import json
import math
import os

import av
import numpy as np
import pytest
import skimage.data
import torch
from helpers import write_video
from PIL import Image
from transformers import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
from transformers.vision_utils import get_vision_position_ids

from unite_jax.data import media
from unite_jax.data.media import MediaError, ProcessorConfig
from unite_jax.data.packing import vision_rope_positions

UNITE_BUDGET = (256 * 28 * 28, 1280 * 28 * 28)
SMALL_BUDGET = (56 * 56, 128 * 28 * 28)


def hf_reference(image, min_pixels, max_pixels):
    processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    out = processor(images=[image], return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"]


def assert_matches_hf(image, min_pixels, max_pixels, ours_input=None):
    cfg = ProcessorConfig(min_pixels=min_pixels, max_pixels=max_pixels)
    patches, grid_thw = media.preprocess_image(image if ours_input is None else ours_input, cfg)
    ref_patches, ref_grid = hf_reference(image, min_pixels, max_pixels)
    assert patches.dtype == np.float32
    np.testing.assert_array_equal(grid_thw, ref_grid[0])
    assert patches.shape == ref_patches.shape == (int(np.prod(grid_thw)), 1176)
    assert np.abs(patches - ref_patches).max() <= 1e-5
    return grid_thw


# ------------------------------------------------------------------ (a) image parity

PHOTO_CROPS = [
    # (photo, crop height, crop width): odd sizes, extreme shapes, one over the UNITE max budget
    ("astronaut", 37, 101),
    ("coffee", 333, 517),
    ("retina", 1000, 77),
    ("chelsea", 300, 451),
    ("rocket", 427, 640),
    ("retina", 1411, 1411),  # 1.99 Mpx > 1280*28*28: downscaled even with the UNITE budget
    ("astronaut", 512, 512),  # > 128*28*28: downscaled with the small budget
    ("chelsea", 20, 45),  # smaller than one 28x28 block: upscaled even with the small budget
]


@pytest.fixture(scope="module")
def photos():
    return {name: getattr(skimage.data, name)() for name in {name for name, _, _ in PHOTO_CROPS}}


@pytest.mark.parametrize("budget", [UNITE_BUDGET, SMALL_BUDGET], ids=["unite", "small"])
@pytest.mark.parametrize("name,height,width", PHOTO_CROPS)
def test_preprocess_image_matches_transformers(photos, name, height, width, budget):
    image = photos[name][:height, :width]
    assert image.shape[:2] == (height, width)
    assert_matches_hf(image, *budget)


def test_parity_cases_exercise_both_budget_limits():
    # Guards the table above: it must contain an upscale (min) and a downscale (max) case
    # for each budget, otherwise the parity test would not cover both branches.
    for min_pixels, max_pixels in (UNITE_BUDGET, SMALL_BUDGET):
        rounded = [round(h / 28) * 28 * round(w / 28) * 28 for _, h, w in PHOTO_CROPS]
        assert any(area < min_pixels for area in rounded)
        assert any(area > max_pixels for area in rounded)


def test_preprocess_image_is_bit_exact():
    # Same arithmetic as the reference (uint8 resize, float64 rescale, float32 normalise),
    # so the tolerance above is not needed at all; a float32-only rescale would differ.
    photo = skimage.data.rocket()[:333, :517]
    patches, _ = media.preprocess_image(photo, ProcessorConfig(min_pixels=UNITE_BUDGET[0], max_pixels=UNITE_BUDGET[1]))
    np.testing.assert_array_equal(patches, hf_reference(photo, *UNITE_BUDGET)[0])


def test_preprocess_image_from_pil_and_file_matches_transformers(tmp_path):
    photo = skimage.data.chelsea()[:211, :333]
    assert_matches_hf(Image.fromarray(photo), *UNITE_BUDGET)
    path = tmp_path / "chelsea.png"
    Image.fromarray(photo).save(path)
    assert_matches_hf(photo, *SMALL_BUDGET, ours_input=str(path))
    assert_matches_hf(photo, *SMALL_BUDGET, ours_input=path)  # os.PathLike


def test_preprocess_image_custom_normalisation_matches_transformers():
    photo = skimage.data.coffee()[:100, :150]
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    cfg = ProcessorConfig(min_pixels=56 * 56, max_pixels=200 * 28 * 28, image_mean=mean, image_std=std)
    patches, _ = media.preprocess_image(photo, cfg)
    ref = Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=200 * 28 * 28, image_mean=list(mean), image_std=list(std)
    )
    np.testing.assert_allclose(patches, ref(images=[photo], return_tensors="np")["pixel_values"], rtol=0, atol=1e-5)


# ------------------------------------------------------------------ (b) smart_resize


def test_smart_resize_table_matches_transformers():
    rng = np.random.default_rng(0)
    sizes = [(28, 28), (37, 101), (333, 517), (1000, 77), (1411, 1411), (5, 7), (14, 42), (42, 14),
             (1, 150), (2, 400), (4000, 3000), (8000, 40), (56, 11200), (10000, 10000), (279, 141)]
    sizes += [tuple(int(v) for v in rng.integers(1, 3000, size=2)) for _ in range(300)]
    budgets = [UNITE_BUDGET, SMALL_BUDGET, (56 * 56, 28 * 28 * 1280), (76800, 76800), (4 * 28 * 28, 16384 * 28 * 28)]
    checked = 0
    for height, width in sizes:
        if max(height, width) / min(height, width) > 200:
            continue
        for min_pixels, max_pixels in budgets:
            expected = hf_smart_resize(height, width, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
            got = media.smart_resize(height, width, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
            assert got == tuple(expected), (height, width, min_pixels, max_pixels)
            assert got[0] % 28 == 0 and got[1] % 28 == 0
            checked += 1
    assert checked > 1000
    # A different factor (e.g. patch 16 x merge 2) follows the same rule.
    assert media.smart_resize(500, 300, factor=32) == tuple(hf_smart_resize(500, 300, factor=32))


def test_smart_resize_errors():
    with pytest.raises(ValueError, match="aspect ratio"):
        media.smart_resize(10, 2011)
    with pytest.raises(ValueError):
        hf_smart_resize(10, 2011)  # the reference refuses it too
    assert media.smart_resize(10, 2000) == tuple(hf_smart_resize(10, 2000))  # ratio exactly 200 is allowed
    with pytest.raises(ValueError, match="positive"):
        media.smart_resize(0, 10)


# ------------------------------------------------------------------ (c) EXIF orientation


def quadrant_image(height=40, width=64):
    """Red top-left, green top-right, blue bottom-left, white bottom-right."""
    image = np.zeros((height, width, 3), np.uint8)
    h2, w2 = height // 2, width // 2
    image[:h2, :w2] = (255, 0, 0)
    image[:h2, w2:] = (0, 255, 0)
    image[h2:, :w2] = (0, 0, 255)
    image[h2:, w2:] = (255, 255, 255)
    return image


def quadrant_colours(image):
    array = np.asarray(image, dtype=np.float64)
    h, w = array.shape[:2]
    centres = [(h // 4, w // 4), (h // 4, 3 * w // 4), (3 * h // 4, w // 4), (3 * h // 4, 3 * w // 4)]
    return [tuple(int(round(v / 255)) for v in array[r, c]) for r, c in centres]


RED, GREEN, BLUE, WHITE = (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1)


@pytest.mark.parametrize(
    "orientation,size,colours",
    [
        (1, (64, 40), [RED, GREEN, BLUE, WHITE]),
        # 6: stored rotated; displaying needs a 90-degree clockwise turn.
        (6, (40, 64), [BLUE, RED, WHITE, GREEN]),
        (3, (64, 40), [WHITE, BLUE, GREEN, RED]),  # 180 degrees
        (8, (40, 64), [GREEN, WHITE, RED, BLUE]),  # 90 degrees counter-clockwise
    ],
)
def test_load_image_applies_exif_orientation(tmp_path, orientation, size, colours):
    path = tmp_path / f"exif{orientation}.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(quadrant_image()).save(path, quality=95, exif=exif)
    loaded = media.load_image(str(path))
    assert loaded.mode == "RGB"
    assert loaded.size == size  # (width, height)
    assert quadrant_colours(loaded) == colours


# ------------------------------------------------------------------ (d) input kinds


def test_rgba_array_and_pil_match_transformers():
    rng = np.random.default_rng(1)
    alpha = rng.integers(0, 256, (90, 130, 1), dtype=np.uint8)
    rgba = np.concatenate([skimage.data.astronaut()[:90, :130], alpha], axis=2)
    assert_matches_hf(rgba, *SMALL_BUDGET)
    assert_matches_hf(Image.fromarray(rgba, mode="RGBA"), *SMALL_BUDGET)
    # Fully transparent pixels become white, opaque ones keep their colour.
    rgba[:10, :, 3] = 0
    rgba[10:20, :, 3] = 255
    rgb = np.asarray(media.load_image(rgba))
    assert (rgb[:10] == 255).all()
    np.testing.assert_array_equal(rgb[10:20], rgba[10:20, :, :3])


def test_grey_and_palette_inputs():
    grey = skimage.data.camera()[:70, :90]
    for source in (grey, grey[:, :, None], Image.fromarray(grey, mode="L")):
        rgb = np.asarray(media.load_image(source))
        assert rgb.shape == (70, 90, 3) and rgb.dtype == np.uint8
        for channel in range(3):
            np.testing.assert_array_equal(rgb[:, :, channel], grey)
    assert_matches_hf(Image.fromarray(grey, mode="L"), *SMALL_BUDGET, ours_input=grey)
    palette = Image.fromarray(skimage.data.coffee()[:60, :80]).convert("P")
    assert_matches_hf(palette, *SMALL_BUDGET)


def test_rgb_array_is_used_unchanged():
    photo = skimage.data.rocket()[:50, :60]
    np.testing.assert_array_equal(np.asarray(media.load_image(photo)), photo)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((10, 10, 3), np.float32),
        np.zeros((10, 10, 2), np.uint8),
        np.zeros((2, 10, 10, 3), np.uint8),
        "not-an-image".encode(),
    ],
)
def test_bad_image_objects(bad):
    with pytest.raises(MediaError):
        media.load_image(bad)


# ------------------------------------------------------------------ (e) video sampling with PyAV

VIDEO_FRAMES, VIDEO_FPS = 50, 10  # 5 seconds


def level(index):
    return 10 + 4 * index  # frame index encoded as a flat brightness


def write_test_video(path, num_frames=VIDEO_FRAMES, fps=VIDEO_FPS, codec="libx264", options=None):
    """64x48 frames of flat brightness level(index): a decoded frame says which one it is."""
    frames = np.stack([np.full((48, 64, 3), level(index), np.uint8) for index in range(num_frames)])
    return write_video(path, frames, fps, codec, options)


def frame_ids(frames):
    return [int(round((float(frame.mean()) - 10) / 4)) for frame in frames]


@pytest.fixture(scope="module")
def mp4_video(tmp_path_factory):
    # libx264 with crf 0 keeps flat frames within +-1 of their level (levels are 4 apart).
    return write_test_video(tmp_path_factory.mktemp("video") / "clip.mp4", options={"crf": "0"})


@pytest.fixture(scope="module")
def mkv_video(tmp_path_factory):
    # Matroska stores no frame count, which exercises the counting pass.
    path = write_test_video(tmp_path_factory.mktemp("video") / "clip.mkv", codec="ffv1")
    with av.open(path) as container:
        assert container.streams.video[0].frames == 0
    return path


@pytest.mark.parametrize(
    "settings,expected",
    [
        ({}, [0, 16, 33, 49]),  # 5 s at 1 fps = 5 -> floored to 4
        ({"video_fps": 2.0}, [0, 5, 11, 16, 22, 27, 33, 38, 44, 49]),  # 10 frames
        ({"video_fps": 10.0}, [0, 4, 9, 13, 18, 22, 27, 31, 36, 40, 45, 49]),  # 50 -> max 12
        ({"video_fps": 0.2}, [0, 16, 33, 49]),  # 1 -> min 4
        ({"video_fps": 1.4, "video_min_frames": 2}, [0, 10, 20, 29, 39, 49]),  # 7 -> floored to 6
        ({"video_fps": 1.0, "video_min_frames": 2, "video_max_frames": 3}, [0, 49]),  # odd max -> 2
    ],
)
def test_load_video_samples_expected_frames(mp4_video, settings, expected):
    cfg = ProcessorConfig(**settings)
    frames = media.load_video(mp4_video, cfg)
    assert len(frames) % 2 == 0
    assert all(frame.shape == (48, 64, 3) and frame.dtype == np.uint8 for frame in frames)
    assert frame_ids(frames) == expected


def test_load_video_without_stored_frame_count(mkv_video, mp4_video):
    cfg = ProcessorConfig(video_fps=2.0)
    assert frame_ids(media.load_video(mkv_video, cfg)) == frame_ids(media.load_video(mp4_video, cfg))
    assert frame_ids(media.load_video(mkv_video, cfg)) == [0, 5, 11, 16, 22, 27, 33, 38, 44, 49]


def test_short_videos(tmp_path):
    three = write_test_video(tmp_path / "three.mp4", num_frames=3, options={"crf": "0"})
    assert frame_ids(media.load_video(three)) == [0, 2]  # fewer frames than min_frames: floor to even
    one = write_test_video(tmp_path / "one.mp4", num_frames=1, options={"crf": "0"})
    with pytest.raises(MediaError, match="one.mp4") as info:
        media.load_video(one)
    assert "at least 2 frames" in str(info.value)


def test_sample_frame_indices_table():
    cfg = ProcessorConfig()
    # 30 s at 30 fps: 30 wanted, capped at 12.
    np.testing.assert_array_equal(
        media.sample_frame_indices(900, 30.0, cfg), [0, 82, 163, 245, 327, 409, 490, 572, 654, 736, 817, 899]
    )
    # 7 wanted, at most 6 (even).
    np.testing.assert_array_equal(media.sample_frame_indices(7, 1.0, cfg), [0, 1, 2, 4, 5, 6])
    np.testing.assert_array_equal(media.sample_frame_indices(6, 30.0, cfg), [0, 2, 3, 5])  # 0.2 wanted -> min 4
    with pytest.raises(ValueError):
        media.sample_frame_indices(1, 30.0, cfg)


def test_frame_lists():
    frames = [np.full((30, 40, 3), level(i), np.uint8) for i in range(13)]
    # 13 > 12: sampled evenly down to 12.
    assert frame_ids(media.load_video(frames)) == [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12]
    # Odd count: the last frame is repeated.
    assert frame_ids(media.load_video(frames[:5])) == [0, 1, 2, 3, 4, 4]
    assert frame_ids(media.load_video(frames[:1])) == [0, 0]
    # PIL frames, grey frames and a [T, H, W, 3] array are accepted.
    mixed = [Image.fromarray(frames[0]), frames[1][:, :, 0], frames[2], frames[3]]
    assert frame_ids(media.load_video(mixed)) == [0, 1, 2, 3]
    assert frame_ids(media.load_video(np.stack(frames[:4]))) == [0, 1, 2, 3]
    loaded = media.load_video(frames[:4])
    assert frame_ids(media.load_video(loaded)) == [0, 1, 2, 3]  # idempotent on its own output
    with pytest.raises(MediaError, match="empty"):
        media.load_video([])
    with pytest.raises(MediaError, match="frame 1"):
        media.load_video([frames[0], np.zeros((30, 40, 3), np.float32)])


# ------------------------------------------------------------------ (f) video patch layout


def loop_reference_patches(normalised, patch=14, temporal=2, merge=2):
    """Explicit loops: normalised [T, H, W, C] -> patches in (t, block_row, block_col, mr, mc) order."""
    num_frames, height, width, _ = normalised.shape
    rows = []
    for t in range(num_frames // temporal):
        for block_row in range(height // patch // merge):
            for block_col in range(width // patch // merge):
                for merge_row in range(merge):
                    for merge_col in range(merge):
                        r0 = (block_row * merge + merge_row) * patch
                        c0 = (block_col * merge + merge_col) * patch
                        cube = normalised[t * temporal:(t + 1) * temporal, r0:r0 + patch, c0:c0 + patch, :]
                        rows.append(cube.transpose(3, 0, 1, 2).reshape(-1))  # (C, T, row, col)
    return np.stack(rows)


def reference_normalise(frames, cfg):
    mean, std = np.array(cfg.image_mean), np.array(cfg.image_std)
    return (np.asarray(frames, np.float64) / 255 - mean) / std


def test_video_patch_layout_matches_loop_reference():
    rng = np.random.default_rng(2)
    frames = [rng.integers(0, 256, (56, 84, 3), dtype=np.uint8) for _ in range(6)]
    cfg = ProcessorConfig(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
    patches, grid_thw = media.preprocess_video(frames, cfg)
    np.testing.assert_array_equal(grid_thw, [3, 4, 6])
    expected = loop_reference_patches(reference_normalise(frames, cfg))
    assert patches.shape == expected.shape == (3 * 4 * 6, 1176)
    np.testing.assert_allclose(patches, expected, rtol=0, atol=1e-5)


def test_video_frames_are_resized_to_first_frame_target():
    photo = skimage.data.coffee()
    frames = [photo[:100, :130], photo[50:150, 100:230], photo[:120, :90]]  # last one differs in size
    cfg = ProcessorConfig(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
    patches, grid_thw = media.preprocess_video(frames, cfg)
    height, width = media.smart_resize(100, 130, 28, 56 * 56, 28 * 28 * 1280)
    np.testing.assert_array_equal(grid_thw, [2, height // 14, width // 14])  # 3 frames padded to 4
    resized = [
        np.asarray(Image.fromarray(np.ascontiguousarray(f)).resize((width, height), Image.Resampling.BICUBIC))
        for f in frames
    ]
    resized.append(resized[-1])
    np.testing.assert_allclose(patches, loop_reference_patches(reference_normalise(resized, cfg)), rtol=0, atol=1e-5)


def test_two_identical_frames_equal_the_image():
    photo = skimage.data.chelsea()[:123, :177]
    for budget in (UNITE_BUDGET, SMALL_BUDGET):
        cfg = ProcessorConfig(min_pixels=budget[0], max_pixels=budget[1])
        image_patches, image_grid = media.preprocess_image(photo, cfg)
        video_patches, video_grid = media.preprocess_video([photo, photo], cfg)
        np.testing.assert_array_equal(video_grid, image_grid)
        np.testing.assert_array_equal(video_patches, image_patches)


def test_video_max_pixels_budget():
    photo = skimage.data.astronaut()[:480, :360]
    cfg = ProcessorConfig(video_max_pixels=240 * 320)
    assert media.video_pixel_budget(cfg) == (240 * 320, 240 * 320)
    _, grid_thw = media.preprocess_video([photo, photo], cfg)
    height, width = grid_thw[1] * 14, grid_thw[2] * 14
    assert (height, width) == media.smart_resize(480, 360, 28, 240 * 320, 240 * 320)
    assert height * width <= 240 * 320
    _, unbounded = media.preprocess_video([photo, photo], ProcessorConfig())
    assert unbounded[1] * unbounded[2] * 196 > 240 * 320


def test_preprocess_video_from_file(mp4_video):
    patches, grid_thw = media.preprocess_video(mp4_video, ProcessorConfig(min_pixels=56 * 56))
    np.testing.assert_array_equal(grid_thw, [2, 4, 4])  # 4 frames; 48x64 -> 56x56
    assert patches.shape == (32, 1176) and patches.dtype == np.float32


# ------------------------------------------------------------------ rotary positions


@pytest.mark.parametrize("grids", [[[1, 4, 6]], [[3, 2, 8], [1, 6, 4]], [[2, 10, 14]]])
def test_vision_rope_positions_match_transformers(grids):
    expected = get_vision_position_ids(torch.tensor(grids), 2).numpy()
    got = vision_rope_positions(np.array(grids), 2)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, expected)
    if len(grids) == 1:
        np.testing.assert_array_equal(vision_rope_positions(np.array(grids[0]), 2), expected)


def test_vision_rope_positions_follow_patch_order():
    # Patch k of a [1, H, W] image comes from pixel block (row*14, col*14) given by its position.
    frames = np.arange(56 * 84, dtype=np.float32).reshape(1, 56, 84, 1).repeat(2, axis=0)
    patches, grid_thw = media.patchify(frames, 14, 2, 2)
    positions = vision_rope_positions(grid_thw, 2)
    first_pixel = patches[:, 0]  # (channel 0, frame 0, row 0, col 0) of each patch
    np.testing.assert_array_equal(first_pixel, positions[:, 0] * 14 * 84 + positions[:, 1] * 14)


# ------------------------------------------------------------------ (g) bad files


def test_missing_image_file(tmp_path):
    path = str(tmp_path / "nope.jpg")
    with pytest.raises(MediaError, match="nope.jpg") as info:
        media.load_image(path)
    assert "not found" in str(info.value)


def test_truncated_jpeg(tmp_path):
    whole = tmp_path / "whole.jpg"
    Image.fromarray(skimage.data.astronaut()).save(whole, quality=90)
    data = whole.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match="cut.jpg") as info:
        media.load_image(str(cut))
    assert "truncated" in str(info.value)
    with pytest.raises(MediaError, match="cut.jpg"):
        media.preprocess_image(str(cut))


def test_non_image_file(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n")
    with pytest.raises(MediaError, match="notes.jpg"):
        media.load_image(str(path))
    with pytest.raises(MediaError, match="not a file"):
        media.load_image(str(tmp_path))


def test_bad_video_files(tmp_path, mp4_video):
    with pytest.raises(MediaError, match="gone.mp4") as info:
        media.load_video(str(tmp_path / "gone.mp4"))
    assert "not found" in str(info.value)
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(3).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    with pytest.raises(MediaError, match="noise.mp4"):
        media.load_video(str(noise))
    text = tmp_path / "text.mp4"
    text.write_text("not a video")
    with pytest.raises(MediaError, match="text.mp4"):
        media.load_video(text)
    # A valid header followed by nothing: the container opens but no frame decodes.
    data = open(mp4_video, "rb").read()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[:64])
    with pytest.raises(MediaError, match="cut.mp4"):
        media.load_video(str(cut))


# ------------------------------------------------------------------ config


def write_json(directory, name, obj):
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj, indent=2))
    return path


def test_from_pretrained_reads_both_budget_forms(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    write_json(old, "preprocessor_config.json", {
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "rescale_factor": 0.00392156862745098,
        "image_processor_type": "Qwen2VLImageProcessor",
    })
    cfg = ProcessorConfig.from_pretrained(old)
    assert (cfg.min_pixels, cfg.max_pixels) == (3136, 12845056)
    assert cfg.image_mean == (0.5, 0.5, 0.5) and cfg.image_std == (0.25, 0.25, 0.25)

    new = tmp_path / "new"
    new.mkdir()
    size = {"shortest_edge": 200704, "longest_edge": 1003520}
    write_json(new, "preprocessor_config.json", {"size": size, "patch_size": 16})
    cfg = ProcessorConfig.from_pretrained(str(new))
    assert (cfg.min_pixels, cfg.max_pixels, cfg.patch_size) == (200704, 1003520, 16)

    both = tmp_path / "both"
    both.mkdir()
    size = {"shortest_edge": 1, "longest_edge": 2}
    write_json(both, "preprocessor_config.json", {"size": size, "min_pixels": 3136, "max_pixels": 50000})
    cfg = ProcessorConfig.from_pretrained(both)
    assert (cfg.min_pixels, cfg.max_pixels) == (3136, 50000)  # top-level keys win, as in transformers


def test_from_pretrained_defaults_video_file_and_overrides(tmp_path):
    cfg = ProcessorConfig.from_pretrained(tmp_path)  # no files: Qwen2-VL class defaults
    assert (cfg.min_pixels, cfg.max_pixels) == (56 * 56, 28 * 28 * 1280)
    assert cfg.image_mean == media.CLIP_MEAN and cfg.patch_size == 14 and cfg.video_max_frames == 12
    video = {"fps": 2.0, "min_frames": 8, "max_frames": 48, "num_frames": None}
    write_json(tmp_path, "video_preprocessor_config.json", video)
    cfg = ProcessorConfig.from_pretrained(tmp_path, min_pixels=256 * 28 * 28, video_max_pixels=240 * 320)
    assert (cfg.video_fps, cfg.video_min_frames, cfg.video_max_frames) == (2.0, 8, 48)
    assert cfg.min_pixels == 256 * 28 * 28 and cfg.video_max_pixels == 240 * 320
    cfg = ProcessorConfig.from_pretrained(tmp_path, video_max_frames=32)
    assert cfg.video_max_frames == 32
    with pytest.raises(TypeError, match="frames_max"):
        ProcessorConfig.from_pretrained(tmp_path, frames_max=3)


def test_from_pretrained_errors_name_file_line_and_field(tmp_path):
    path = write_json(tmp_path, "preprocessor_config.json", '{\n  "min_pixels": 3136,\n  "max_pixels": ,\n}\n')
    with pytest.raises(ValueError, match=r"preprocessor_config\.json:3:") as info:
        ProcessorConfig.from_pretrained(tmp_path)
    assert path in str(info.value)
    write_json(tmp_path, "preprocessor_config.json", {"min_pixels": "many"})
    with pytest.raises(ValueError, match="'min_pixels'"):
        ProcessorConfig.from_pretrained(tmp_path)
    write_json(tmp_path, "preprocessor_config.json", {"image_mean": [0.5, 0.5]})
    with pytest.raises(ValueError, match="'image_mean'"):
        ProcessorConfig.from_pretrained(tmp_path)
    write_json(tmp_path, "preprocessor_config.json", {"size": {"height": 224, "width": 224}})
    with pytest.raises(ValueError, match="shortest_edge"):
        ProcessorConfig.from_pretrained(tmp_path)
    write_json(tmp_path, "preprocessor_config.json", {"min_pixels": 3136})
    write_json(tmp_path, "video_preprocessor_config.json", "[1, 2]")
    with pytest.raises(ValueError, match="video_preprocessor_config.json"):
        ProcessorConfig.from_pretrained(tmp_path)


def test_config_validation():
    with pytest.raises(ValueError, match="min_pixels"):
        ProcessorConfig(min_pixels=10, max_pixels=5)
    with pytest.raises(ValueError, match="video_min_frames"):
        ProcessorConfig(video_min_frames=20, video_max_frames=12)
    with pytest.raises(ValueError, match="video_max_pixels"):
        ProcessorConfig(video_max_pixels=0)
    cfg = ProcessorConfig(image_mean=[0.1, 0.2, 0.3])
    assert cfg.image_mean == (0.1, 0.2, 0.3) and hash(cfg) == hash(ProcessorConfig(image_mean=(0.1, 0.2, 0.3)))
    assert cfg.patch_dim == 1176 and cfg.resize_factor == 28
    assert math.isclose(cfg.rescale_factor, 1 / 255)


def test_processor_config_save_pretrained_round_trips_and_loads_in_transformers(tmp_path):
    from transformers import Qwen2VLImageProcessorPil

    cfg = media.ProcessorConfig(min_pixels=12 * 28 * 28, max_pixels=99 * 28 * 28, image_mean=(0.5, 0.4, 0.3))
    cfg.save_pretrained(tmp_path)
    loaded = media.ProcessorConfig.from_pretrained(tmp_path)
    for field in ("min_pixels", "max_pixels", "image_mean", "image_std", "patch_size", "merge_size"):
        assert getattr(loaded, field) == getattr(cfg, field), field
    theirs = Qwen2VLImageProcessorPil.from_pretrained(str(tmp_path))
    image = np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    expected = theirs(images=[image], return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(media.preprocess_image(image, loaded)[0], expected)
