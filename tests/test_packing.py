"""Packing invariants: every merged token lands in its own pad slot, segments and positions are right."""

import numpy as np
import pytest

from unite_jax.data.packing import PackableInput, bucket, choose_shapes, first_fit, pack_batch, vision_rope_positions

PAD, IMG = 0, 5


def _item(rng, text_before, grids, text_after=3):
    ids, runs, patches = [], [], []
    ids += list(rng.integers(10, 100, text_before))
    for t, h, w in grids:
        ids.append(3)
        runs.append((len(ids), t * h * w // 4))
        ids += [IMG] * (t * h * w // 4)
        ids.append(4)
        # each patch carries a unique marker so we can trace where it went
        patches.append(rng.standard_normal((t * h * w, 6)).astype(np.float32))
    ids += list(rng.integers(10, 100, text_after)) + [PAD]
    return PackableInput(np.asarray(ids, np.int32), patches, list(grids), runs)


def test_pack_batch_layout():
    rng = np.random.default_rng(0)
    items = [_item(rng, 2, [(1, 4, 4)]), _item(rng, 5, []), _item(rng, 1, [(1, 2, 6), (3, 2, 2)]),
             _item(rng, 0, [(1, 4, 2)])]
    shards, rows_per_shard, seq, budget = 2, 3, 40, 64
    batch = pack_batch(items, num_shards=shards, rows_per_shard=rows_per_shard, seq_len=seq, patch_budget=budget,
                       pad_id=PAD, patch_dim=6)
    assert batch["input_ids"].shape == (6, seq) and batch["patches"].shape == (2, budget, 6)
    np.testing.assert_array_equal(batch["valid"], [True] * 4 + [False] * 2)
    for row, item in enumerate(items):
        n = item.num_tokens
        np.testing.assert_array_equal(batch["input_ids"][row, -n:], item.input_ids)  # left padding
        assert (batch["input_ids"][row, :-n] == PAD).all() and batch["attention_mask"][row, :-n].sum() == 0
        assert batch["attention_mask"][row, -n:].all()
    np.testing.assert_array_equal(batch["position_ids"][:, 0], np.broadcast_to(np.arange(seq), (6, seq)))
    # padding rows hold a lone token so their forward is defined
    assert batch["attention_mask"][4:].sum() == 2

    for shard in range(shards):
        dest = batch["merged_dest"][shard]
        flat_ids = batch["input_ids"][shard * rows_per_shard:(shard + 1) * rows_per_shard].reshape(-1)
        used = dest < rows_per_shard * seq
        # every merged token goes to an image pad slot, each slot is filled exactly once
        assert (flat_ids[dest[used]] == IMG).all()
        assert len(set(dest[used])) == used.sum() == (flat_ids == IMG).sum()
        assert (dest[~used] == rows_per_shard * seq).all()
        # patches of merged token k are patches 4k..4k+3 of the row, and belong to the right item
        real = batch["patch_segment_ids"][shard] >= 0
        assert real.sum() == 4 * used.sum()
    # item 2 (shard 0, row 2): its video's 3 temporal slices get 3 distinct segments, images one each
    segments = batch["patch_segment_ids"][0]
    seg_used = segments[segments >= 0]
    assert len(np.unique(seg_used)) == 1 + 1 + 3  # item0 image, item2 image, item2 video slices
    # item 3 starts shard 1 and its patches come first there
    np.testing.assert_array_equal(batch["patches"][1, :8], items[3].patches[0])
    np.testing.assert_array_equal(batch["patch_positions"][1, :8], vision_rope_positions([1, 4, 2], 2))
    # the destination of item 3's merged tokens: row 0 of shard 1, at its pad run after left padding
    offset = seq - items[3].num_tokens
    start, length = items[3].vision_runs[0]
    np.testing.assert_array_equal(batch["merged_dest"][1, :length], offset + start + np.arange(length))


def test_pack_batch_rejects_overflow():
    rng = np.random.default_rng(1)
    items = [_item(rng, 2, [(1, 8, 8)])]
    with pytest.raises(ValueError, match="2 vision blocks of 64 patches, more than the patch budget 64"):
        pack_batch(items * 2, num_shards=1, rows_per_shard=2, seq_len=64, patch_budget=64, pad_id=PAD,
                   patch_dim=6, vision_block=64)
    with pytest.raises(ValueError, match="more than the sequence bucket"):
        pack_batch(items, num_shards=1, rows_per_shard=1, seq_len=8, patch_budget=64, pad_id=PAD, patch_dim=6)
    with pytest.raises(ValueError, match="does not fit a vision block of 32"):
        pack_batch(items, num_shards=1, rows_per_shard=1, seq_len=64, patch_budget=64, pad_id=PAD, patch_dim=6,
                   vision_block=32)
    assert bucket(33, (32, 64)) == 64
    with pytest.raises(ValueError, match="largest bucket"):
        bucket(65, (32, 64))


def test_vision_blocks_hold_whole_slices_and_route_every_patch():
    """With tiles, each temporal slice sits inside one tile and its merged tokens still reach their own pads."""
    rng = np.random.default_rng(2)
    items = [_item(rng, 1, [(1, 4, 6), (2, 2, 4)]), _item(rng, 3, [(1, 6, 4)]), _item(rng, 2, [(1, 2, 2)])]
    seq, budget, block = choose_shapes(items, 1, 3)
    assert block == 64 and budget == 128 and seq == bucket(max(i.num_tokens for i in items), (32, 64))
    batch = pack_batch(items, num_shards=1, rows_per_shard=3, seq_len=seq, patch_budget=budget, pad_id=PAD,
                       patch_dim=6, vision_block=block)
    segments = batch["patch_segment_ids"][0]
    for segment in np.unique(segments[segments >= 0]):
        where = np.flatnonzero(segments == segment)
        assert where[0] // block == where[-1] // block  # never straddles a tile
        assert (np.diff(where) == 1).all()
    # trace every patch: the merged token of patches 4j..4j+3 goes to the pad slot of its own media
    flat_ids = batch["input_ids"].reshape(-1)
    for row, item in enumerate(items):
        offset = seq - item.num_tokens
        for k, patches in enumerate(item.patches):
            start, length = item.vision_runs[k]
            for j in range(length):
                slot = row * seq + offset + start + j
                where = np.flatnonzero(batch["merged_dest"][0] == slot)
                assert len(where) == 1 and flat_ids[slot] == IMG
                np.testing.assert_array_equal(batch["patches"][0, 4 * where[0]:4 * where[0] + 4],
                                              patches[4 * j:4 * j + 4])


def test_first_fit():
    assert first_fit([10, 30, 20, 2], 32) == ([0, 32, 10, 30], 2)
    assert first_fit([10, 30, 20, 5], 32) == ([0, 32, 10, 64], 3)
    assert first_fit([], 8) == ([], 0)
    with pytest.raises(ValueError, match="does not fit"):
        first_fit([9], 8)
