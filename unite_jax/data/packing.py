"""Host-side packing of tokenised inputs into the static-shape batch of the embedder.

Layout (DESIGN.md "Static shapes and packing"); S shards, b rows per shard, L tokens, P patches:
  input_ids         [S*b, L] int32   left-padded with <|endoftext|>
  attention_mask    [S*b, L] int32   0 on left padding
  position_ids      [S*b, 3, L] int32 sequential (UNITE) or Qwen2-VL 3-D M-RoPE
  patches           [S, P, patch_dim] float32, every media of the shard's rows, in row order
  patch_segment_ids [S, P] int32     one id per (media, temporal slice); -1 = padding. P is a whole
                                     number of vision blocks, and each slice lies inside one block
  patch_positions   [S, P, 2] int32  (row, column) of each patch, merge-window order
  merged_dest       [S, P/4] int32   slot of each merged token in the shard's b*L text slots; b*L = dropped
  valid             [S*b] bool       False for rows that only pad the batch
A new input size only compiles anew when it crosses into a new (L, P, block) bucket.
The embedder (`unite_jax.model.embedder.embed`) reads the BATCH_KEYS; `valid` stays on the host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from unite_jax.data.pixel_patches import PixelPatches, write_patches


def geometric_buckets(start: int, stop: int, multiple: int) -> tuple[int, ...]:
    """Sizes from `start` to `stop` in quarter-octave steps, rounded up to `multiple`.

    At most ~19% padding, 4 shapes (compilations) per doubling.
    """
    sizes, k = set(), 0
    while (size := -(-int(start * 2 ** (k / 4)) // multiple) * multiple) <= stop:
        sizes.add(size)
        k += 1
    return tuple(sorted(sizes))


# The arrays of a packed batch that the embedder reads (everything pack_batch returns but `valid`).
BATCH_KEYS = ("input_ids", "attention_mask", "position_ids", "patches", "patch_segment_ids", "patch_positions",
              "merged_dest")
SEQ_BUCKETS = geometric_buckets(32, 65536, 16)
# Vision attention tile sizes in patches (multiples of 16 keep 2x2 merge windows whole).
VISION_BLOCK_BUCKETS = geometric_buckets(64, 32768, 16)
BLOCK_COUNT_BUCKETS = geometric_buckets(1, 65536, 1)


@dataclasses.dataclass
class PackableInput:
    """One tokenised input with its pre-processed media (media in the order of `vision_runs`).

    input_ids: [n] int32 (pads expanded); patches[k]: [t*h*w, patch_dim], a float array or
    `PixelPatches` (normalised when packed); grids[k]: (t, h, w);
    vision_runs[k]: (start, length) of media k's pad tokens in input_ids.
    """

    input_ids: np.ndarray
    patches: list[np.ndarray | PixelPatches]
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


def vision_rope_positions(grid_thw: np.ndarray | Sequence[int], merge_size: int = 2) -> np.ndarray:
    """(row, col) of every patch, int32 [N, 2], in the patches' merge-window order.

    grid_thw: [3] or [num_media, 3]; N = sum(t * h * w). Positions restart for each
    temporal slice (the vision rotary embedding is 2-D) and for each medium.
    """
    grids = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    parts = []
    for grid_t, grid_h, grid_w in grids.tolist():
        if grid_h % merge_size or grid_w % merge_size:
            raise ValueError(
                f"vision_rope_positions: grid {grid_h}x{grid_w} is not divisible by merge_size {merge_size}"
            )
        rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
        window_shape = (grid_h // merge_size, merge_size, grid_w // merge_size, merge_size)
        rows = rows.reshape(window_shape).transpose(0, 2, 1, 3).reshape(-1)
        cols = cols.reshape(window_shape).transpose(0, 2, 1, 3).reshape(-1)
        parts.append(np.tile(np.stack([rows, cols], axis=-1), (grid_t, 1)))
    if not parts:
        return np.zeros((0, 2), dtype=np.int32)
    return np.concatenate(parts).astype(np.int32)


def _slices_per_shard(items: list[PackableInput], num_shards: int, rows_per_shard: int) -> list[list[tuple]]:
    """For each shard, its vision slices in row order: (row, media index, temporal index, h, w)."""
    shards = [[] for _ in range(num_shards)]
    for row, item in enumerate(items):
        for k, (t, h, w) in enumerate(item.grids):
            shards[row // rows_per_shard] += [(row, k, ti, h, w) for ti in range(t)]
    return shards


def first_fit(lengths: list[int], block: int) -> tuple[list[int], int]:
    """Offsets that put each length inside one block of `block` slots (first fit), and the blocks used."""
    fill: list[int] = []
    offsets = []
    for length in lengths:
        if length > block:
            raise ValueError(f"a {length}-patch frame does not fit a vision block of {block} patches")
        for b, used in enumerate(fill):
            if used + length <= block:
                offsets.append(b * block + used)
                fill[b] += length
                break
        else:
            offsets.append(len(fill) * block)
            fill.append(length)
    return offsets, len(fill)


def choose_shapes(items: list[PackableInput], num_shards: int, rows_per_shard: int) -> tuple[int, int, int]:
    """(seq_len, patch_budget, vision_block) buckets that fit `items` packed as `pack_batch` does."""
    seq_len = bucket(max(item.num_tokens for item in items), SEQ_BUCKETS)
    slices = _slices_per_shard(items, num_shards, rows_per_shard)
    longest = max((h * w for shard in slices for (_, _, _, h, w) in shard), default=1)
    block = bucket(longest, VISION_BLOCK_BUCKETS)
    blocks = max(first_fit([h * w for (_, _, _, h, w) in shard], block)[1] for shard in slices)
    return seq_len, block * bucket(max(blocks, 1), BLOCK_COUNT_BUCKETS), block


def tile_offsets(slices: list[tuple], block: int, share_tiles: bool = True) -> tuple[list[int], int]:
    """Patch offset of each vision slice (row, media, temporal index, h, w) of one shard, and the tiles used.

    share_tiles=True: all slices of the shard are placed first fit into tiles of `block` patches.
    share_tiles=False: each row's slices are placed first fit into tiles of that row alone, the rows'
    tiles following each other; a shard whose every row needs at most k tiles then needs at most
    rows * k tiles, whatever the other rows hold (the static budget of training batches).
    """
    if share_tiles:
        return first_fit([h * w for (_, _, _, h, w) in slices], block)
    offsets, used, start = [], 0, 0
    while start < len(slices):
        end = start
        while end < len(slices) and slices[end][0] == slices[start][0]:
            end += 1
        row_offsets, row_tiles = first_fit([h * w for (_, _, _, h, w) in slices[start:end]], block)
        offsets += [used * block + offset for offset in row_offsets]
        used += row_tiles
        start = end
    return offsets, used


def pack_batch(items: list[PackableInput], *, num_shards: int, rows_per_shard: int, seq_len: int,
               patch_budget: int, pad_id: int, patch_dim: int, merge_size: int = 2,
               position_mode: str = "sequential", vision_block: int | None = None,
               share_tiles: bool = True, patches_out: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Packs up to num_shards * rows_per_shard inputs (item i goes to shard i // rows_per_shard).

    Each (media, temporal slice) is placed inside one block of `vision_block` patches (first fit;
    None = the whole row is one block), so the vision tower can attend tile by tile. With
    share_tiles=False no tile holds slices of two rows (see `tile_offsets`). patches_out: an
    all-zero float32 [num_shards, patch_budget, patch_dim] buffer to pack the patches into (e.g.
    shared memory), instead of a new array; a uint8 buffer receives pixel levels (items must carry
    `PixelPatches`). Raises ValueError
    when an input is longer than seq_len or a shard's slices do not fit patch_budget;
    `choose_shapes` picks buckets that fit.
    """
    rows = num_shards * rows_per_shard
    if len(items) > rows:
        raise ValueError(f"{len(items)} inputs do not fit {num_shards} shards x {rows_per_shard} rows")
    merge_unit = merge_size**2
    block = vision_block or patch_budget
    if block % merge_unit or patch_budget % block:
        raise ValueError(f"vision block {block} must be a multiple of {merge_unit} and divide the patch budget "
                         f"{patch_budget}")
    input_ids = np.full((rows, seq_len), pad_id, np.int32)
    attention_mask = np.zeros((rows, seq_len), np.int32)
    position_ids = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, 3, seq_len)).copy()
    if patches_out is None:
        patches = np.zeros((num_shards, patch_budget, patch_dim), np.float32)
    elif patches_out.shape != (num_shards, patch_budget, patch_dim) or patches_out.dtype not in (np.float32,
                                                                                                np.uint8):
        raise ValueError(f"patches_out is {patches_out.dtype} {patches_out.shape}, expected float32 or uint8 "
                         f"{(num_shards, patch_budget, patch_dim)}")
    else:
        patches = patches_out
    segment_ids = np.full((num_shards, patch_budget), -1, np.int32)
    patch_positions = np.zeros((num_shards, patch_budget, 2), np.int32)
    dump_slot = rows_per_shard * seq_len
    merged_dest = np.full((num_shards, patch_budget // merge_unit), dump_slot, np.int32)
    valid = np.zeros((rows,), bool)

    for row, item in enumerate(items):
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
        for media_patches, grid, (_, length) in zip(item.patches, item.grids, item.vision_runs):
            t, h, w = grid
            count = media_patches.shape[0]
            if count != t * h * w or count != length * merge_unit:
                raise ValueError(f"input {row}: media of grid {grid} has {count} patches for {length} pad tokens")

    for shard, slices in enumerate(_slices_per_shard(items, num_shards, rows_per_shard)):
        offsets, blocks = tile_offsets(slices, block, share_tiles)
        if blocks * block > patch_budget:
            raise ValueError(f"shard {shard} needs {blocks} vision blocks of {block} patches, more than the patch "
                             f"budget {patch_budget}")
        for segment, ((row, k, ti, h, w), lo) in enumerate(zip(slices, offsets)):
            item = items[row]
            size = h * w
            write_patches(patches[shard, lo:lo + size], item.patches[k][ti * size:(ti + 1) * size])
            segment_ids[shard, lo:lo + size] = segment
            patch_positions[shard, lo:lo + size] = vision_rope_positions((1, h, w), merge_size)
            start, _ = item.vision_runs[k]
            row_start = (row % rows_per_shard) * seq_len + (seq_len - item.num_tokens)  # where the row's input begins
            first_token = row_start + start + ti * size // merge_unit
            merged_dest[shard, lo // merge_unit:(lo + size) // merge_unit] = first_token + np.arange(size // merge_unit)

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

