"""Patches kept as uint8 levels: written as normalised floats or as levels normalised on the device.

The reference is written from the formula: rescale in float64, cast to float32, (x - mean) / std in
float32, then `media.patchify` (itself checked against transformers in test_media.py).
"""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from unite_jax.data import media
from unite_jax.data.pixel_patches import PixelPatches, write_patches
from unite_jax.model.pixels import normalize_levels, normalize_stream

CFG = media.ProcessorConfig()
TABLE = media.normalize_table(CFG)


def reference_patches(frames: np.ndarray) -> np.ndarray:
    """uint8 [T, H, W, 3] -> float32 patches the reference way (an image, T=1, repeated to 2 frames)."""
    scaled = (frames.astype(np.float64) * CFG.rescale_factor).astype(np.float32)
    normalised = (scaled - np.asarray(CFG.image_mean, np.float32)) / np.asarray(CFG.image_std, np.float32)
    if len(frames) == 1:
        normalised = np.repeat(normalised, 2, axis=0)
    return media.patchify(normalised, 14, 2, 2)[0]


def levels_of(frames):
    return PixelPatches.from_frames(frames, TABLE, patch_size=14, temporal_patch_size=2, merge_size=2)


@pytest.fixture(params=[(1, 56, 84), (4, 28, 56)], ids=["image", "video"])
def frames(request):
    return np.random.default_rng(0).integers(0, 256, (*request.param, 3), dtype=np.uint8)


def test_float_patches_match_the_reference_formula(frames):
    patches = levels_of(frames)
    expected = reference_patches(frames)
    assert patches.shape == expected.shape and len(patches) == expected.shape[0]
    np.testing.assert_array_equal(np.asarray(patches), expected)


def test_row_slices_stay_levels_and_match(frames):
    patches, expected = levels_of(frames), reference_patches(frames)
    part = patches[4:12]
    assert isinstance(part, PixelPatches) and part.shape == (8, expected.shape[1])
    np.testing.assert_array_equal(np.asarray(part), expected[4:12])
    with pytest.raises(TypeError, match="step 1"):
        patches[::2]


def test_levels_normalised_on_the_device_are_bit_identical(frames):
    patches, expected = levels_of(frames), reference_patches(frames)
    levels = np.zeros(patches.shape, np.uint8)
    write_patches(levels, patches)
    np.testing.assert_array_equal(np.asarray(normalize_levels(jnp.asarray(levels), TABLE)), expected)


def test_bfloat16_is_the_float32_value_rounded_once(frames):
    patches, expected = levels_of(frames), reference_patches(frames)
    out = np.zeros(patches.shape, ml_dtypes.bfloat16)
    patches.write_into(out)
    np.testing.assert_array_equal(out, expected.astype(ml_dtypes.bfloat16))


def test_writes_land_only_in_the_given_rows():
    patches = levels_of(np.random.default_rng(1).integers(0, 256, (1, 28, 28, 3), dtype=np.uint8))
    buffer = np.zeros((10, patches.shape[1]), np.float32)
    write_patches(buffer[3:7], patches)
    assert not buffer[:3].any() and not buffer[7:].any()
    np.testing.assert_array_equal(buffer[3:7], np.asarray(patches))


def test_bad_uses_are_clear_errors():
    patches = levels_of(np.zeros((1, 28, 28, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8 patch buffer takes PixelPatches"):
        write_patches(np.zeros((4, 1176), np.uint8), np.zeros((4, 1176), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        patches.write_into(np.zeros((5, 1176), np.float32))
    with pytest.raises(ValueError, match="multiples of 28"):
        levels_of(np.zeros((1, 30, 28, 3), np.uint8))
    with pytest.raises(ValueError, match="T must be 1 or a multiple of 2"):
        levels_of(np.zeros((3, 28, 28, 3), np.uint8))
    with pytest.raises(ValueError, match="does not fit"):
        normalize_levels(jnp.zeros((2, 1175), jnp.uint8), TABLE)


def test_normalize_stream_needs_a_table_for_levels_and_zeroes_padding():
    stream = {"patches": jnp.full((1, 8, 1176), 200, jnp.uint8),
              "patch_segment_ids": jnp.asarray([[0, 0, 0, 0, -1, -1, -1, -1]], jnp.int32)}
    with pytest.raises(ValueError, match="pixel table"):
        normalize_stream(stream, None)
    patches = np.asarray(normalize_stream(stream, TABLE)["patches"])
    assert patches.dtype == np.float32 and not patches[0, 4:].any()
    np.testing.assert_array_equal(patches[0, :4, 0], np.full(4, TABLE[0, 200]))
    np.testing.assert_array_equal(patches[0, :4, -1], np.full(4, TABLE[2, 200]))
    floats = dict(stream, patches=jnp.ones((1, 8, 1176), jnp.float32))
    assert normalize_stream(floats, None) is floats
