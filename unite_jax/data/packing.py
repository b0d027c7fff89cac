"""Host-side packing of tokenised inputs into the static-shape batch of the embedder.

Layout (DESIGN.md "Static shapes and packing"); S shards, b rows per shard, L tokens, P patches:
  input_ids         [S*b, L] int32   left-padded with <|endoftext|>
  attention_mask    [S*b, L] int32   0 on left padding
  position_ids      [S*b, 3, L] int32 sequential (UNITE) or Qwen2-VL 3-D M-RoPE
  patches           [S, P, patch_dim] float32, every media of the shard's rows, in row order
  patch_segment_ids [S, P] int32     one id per (media, temporal slice); -1 = padding
  patch_positions   [S, P, 2] int32  (row, column) of each patch, merge-window order
  merged_dest       [S, P/4] int32   slot of each merged token in the shard's b*L text slots; b*L = dropped
  valid             [S*b] bool       False for rows that only pad the batch
A new input size only compiles anew when it crosses into a new (L, P) bucket.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from unite_jax.data.media import vision_rope_positions

SEQ_BUCKETS = tuple(32 * 2**k for k in range(12))  # 32 ... 65536
PATCH_BUCKETS = tuple(64 * 2**k for k in range(14))  # 64 ... 524288


@dataclasses.dataclass
class PackableInput:
    """One tokenised input with its pre-processed media (media in the order of `vision_runs`).

    input_ids: [n] int32 (pads expanded); patches[k]: [t*h*w, patch_dim]; grids[k]: (t, h, w);
    vision_runs[k]: (start, length) of media k's pad tokens in input_ids.
    """

    input_ids: np.ndarray
    patches: list[np.ndarray]
    grids: list[tuple[int, int, int]]
    vision_runs: list[tuple[int, int]]

    @property
    def num_patches(self) -> int:
        return int(sum(p.shape[0] for p in self.patches))

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def bucket(value: int, buckets: tuple[int, ...]) -> int:
    """Smallest bucket >= value."""
    for size in buckets:
        if size >= value:
            return size
    raise ValueError(f"{value} exceeds the largest bucket {buckets[-1]}")


def mrope_positions(item: PackableInput, merge_size: int) -> np.ndarray:
    """[3, n] int32 Qwen2-VL 3-D positions of one unpadded input.

    Text tokens advance all three sections together; a vision block of merged grid
    (t, h', w') takes (start + t_i, start + h_i, start + w_i); the text after it
    continues at the block's largest position + 1 (the original Qwen2-VL rule).
    """
    n = item.num_tokens
    positions = np.zeros((3, n), np.int64)
    runs = sorted(zip(item.vision_runs, item.grids))
    cursor, next_pos = 0, 0
    for (start, length), (t, h, w) in runs:
        text_len = start - cursor
        positions[:, cursor:start] = next_pos + np.arange(text_len)
        next_pos += text_len
        gh, gw = h // merge_size, w // merge_size
        if t * gh * gw != length:
            raise ValueError(f"vision run of {length} tokens does not match grid {(t, h, w)}")
        ti, hi, wi = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
        block = np.stack([ti.ravel(), hi.ravel(), wi.ravel()]) + next_pos
        positions[:, start:start + length] = block
        next_pos = int(block.max()) + 1
        cursor = start + length
    positions[:, cursor:] = next_pos + np.arange(n - cursor)
    return positions.astype(np.int32)


def pack_batch(items: list[PackableInput], *, num_shards: int, rows_per_shard: int, seq_len: int,
               patch_budget: int, pad_id: int, patch_dim: int, merge_size: int = 2,
               position_mode: str = "sequential", max_segment_patches: int = 0) -> dict[str, np.ndarray]:
    """Packs up to num_shards * rows_per_shard inputs (item i goes to shard i // rows_per_shard).

    Raises ValueError when an input is longer than seq_len or a shard's patches exceed patch_budget
    (callers pick the buckets with `bucket` first), or when a temporal slice holds more than
    `max_segment_patches` patches (the vision attention window; 0 = unbounded).
    """
    rows = num_shards * rows_per_shard
    if len(items) > rows:
        raise ValueError(f"{len(items)} inputs do not fit {num_shards} shards x {rows_per_shard} rows")
    merge_unit = merge_size**2
    if patch_budget % merge_unit:
        raise ValueError(f"patch budget {patch_budget} must be a multiple of {merge_unit}")
    input_ids = np.full((rows, seq_len), pad_id, np.int32)
    attention_mask = np.zeros((rows, seq_len), np.int32)
    position_ids = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, 3, seq_len)).copy()
    patches = np.zeros((num_shards, patch_budget, patch_dim), np.float32)
    segment_ids = np.full((num_shards, patch_budget), -1, np.int32)
    patch_positions = np.zeros((num_shards, patch_budget, 2), np.int32)
    dump_slot = rows_per_shard * seq_len
    merged_dest = np.full((num_shards, patch_budget // merge_unit), dump_slot, np.int32)
    valid = np.zeros((rows,), bool)
    fill = np.zeros(num_shards, np.int64)  # patches used per shard
    next_segment = np.zeros(num_shards, np.int64)

    for row, item in enumerate(items):
        shard, local_row = divmod(row, rows_per_shard)
        n = item.num_tokens
        if n > seq_len:
            raise ValueError(f"input {row} has {n} tokens, more than the sequence bucket {seq_len}")
        offset = seq_len - n  # left padding
        input_ids[row, offset:] = item.input_ids
        attention_mask[row, offset:] = 1
        valid[row] = True
        if position_mode == "mrope":
            position_ids[row] = 0
            position_ids[row, :, offset:] = mrope_positions(item, merge_size)
        elif position_mode != "sequential":
            raise ValueError(f"unknown position mode {position_mode!r}")
        for media_patches, grid, (start, length) in zip(item.patches, item.grids, item.vision_runs):
            t, h, w = grid
            count = media_patches.shape[0]
            if count != t * h * w or count != length * merge_unit:
                raise ValueError(f"input {row}: media of grid {grid} has {count} patches for {length} pad tokens")
            if max_segment_patches and h * w > max_segment_patches:
                raise ValueError(f"input {row}: a {h}x{w}-patch frame exceeds the vision attention window of "
                                 f"{max_segment_patches} patches (raise the window or lower max_pixels)")
            lo = int(fill[shard])
            if lo + count > patch_budget:
                raise ValueError(f"shard {shard} needs more than the patch budget {patch_budget}")
            patches[shard, lo:lo + count] = media_patches
            # one segment per temporal slice: slices of a video attend only within themselves
            slice_ids = next_segment[shard] + np.repeat(np.arange(t), h * w)
            segment_ids[shard, lo:lo + count] = slice_ids
            next_segment[shard] += t
            patch_positions[shard, lo:lo + count] = vision_rope_positions(np.asarray([grid]), merge_size)
            dest = local_row * seq_len + offset + start + np.arange(length)
            merged_dest[shard, lo // merge_unit:(lo + count) // merge_unit] = dest
            fill[shard] += count

    # Rows that only pad the batch hold a lone <|endoftext|> so their forward stays well defined.
    for row in range(len(items), rows):
        attention_mask[row, -1] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "patches": patches,
        "patch_segment_ids": segment_ids,
        "patch_positions": patch_positions,
        "merged_dest": merged_dest,
        "valid": valid,
    }


def shard_patch_counts(items: list[PackableInput], num_shards: int, rows_per_shard: int) -> np.ndarray:
    """[num_shards] patches each shard would hold."""
    counts = np.zeros(num_shards, np.int64)
    for row, item in enumerate(items):
        counts[row // rows_per_shard] += item.num_patches
    return counts
