"""Vision patches kept as uint8 pixel levels until they are written into a batch.

A 640x480 photo at UNITE's budget is 1564 patches of 1176 float32 values: 7.4 MB, twice
over for an image because its one frame is repeated to fill the temporal patch. Holding
the uint8 levels instead (0.9 MB) and normalising while copying into the batch buffer
skips that intermediate array, its allocation and a copy: the normalised values are
produced once, in place. Normalisation is a lookup per (channel, level), so the values
are bit-identical to normalising first.

    patches = PixelPatches.from_frames(frames_uint8, table, patch_size=14, temporal_patch_size=2, merge_size=2)
    patches.shape              # (N, 3 * 2 * 14 * 14)
    patches.write_into(out)    # out: float [N, patch_dim], e.g. a slice of the batch buffer
    np.asarray(patches)        # float32 [N, patch_dim], for code that wants an array
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class PixelPatches:
    """N patches of uint8 levels, normalised through `table` when written.

    levels: uint8 [channels, N, frames, patch_size**2]. frames is temporal_patch_size for
        a video; 1 for an image, whose single frame stands for every temporal position.
    table: float32 [channels, 256], the normalised value of each level in each channel.
    temporal_patch_size: frames per patch in the written layout.
    Written patches flatten as (channel, temporal, patch_row, patch_col), like `patchify`.
    """

    levels: np.ndarray
    table: np.ndarray
    temporal_patch_size: int

    def __post_init__(self):
        if self.levels.dtype != np.uint8 or self.levels.ndim != 4:
            raise ValueError(f"levels must be uint8 [channels, N, frames, pixels], got {self.levels.dtype} "
                             f"{self.levels.shape}")
        if self.levels.shape[2] not in (1, self.temporal_patch_size):
            raise ValueError(f"levels hold {self.levels.shape[2]} frames per patch; expected 1 or "
                             f"{self.temporal_patch_size}")
        if self.table.shape != (self.levels.shape[0], 256):
            raise ValueError(f"table {self.table.shape} does not match {self.levels.shape[0]} channels")

    @classmethod
    def from_frames(cls, frames: np.ndarray, table: np.ndarray, *, patch_size: int, temporal_patch_size: int,
                    merge_size: int) -> PixelPatches:
        """uint8 [T, H, W, C] frames -> patches in merge-window order (t, h/m, w/m, m, m).

        T == 1 is an image (repeated over the temporal patch when written); otherwise T must be a
        multiple of temporal_patch_size and consecutive frames form the temporal patches.
        H and W must be multiples of patch_size * merge_size.
        """
        num_frames, height, width, channels = frames.shape
        window = patch_size * merge_size
        if height % window or width % window:
            raise ValueError(f"frames {frames.shape}: H and W must be multiples of {window}")
        frames_per_patch = 1 if num_frames == 1 else temporal_patch_size
        if num_frames % frames_per_patch:
            raise ValueError(f"frames {frames.shape}: T must be 1 or a multiple of {temporal_patch_size}")
        grid_t, rows, cols = num_frames // frames_per_patch, height // window, width // window
        blocks = np.asarray(frames, np.uint8).reshape(
            grid_t, frames_per_patch, rows, merge_size, patch_size, cols, merge_size, patch_size, channels)
        # axes: 0 t, 1 frame, 2 block_row, 3 merge_row, 4 patch_row, 5 block_col, 6 merge_col, 7 patch_col,
        # 8 channel -> (channel, t, block_row, block_col, merge_row, merge_col, frame, patch_row, patch_col)
        levels = np.ascontiguousarray(blocks.transpose(8, 0, 2, 5, 3, 6, 1, 4, 7))
        num_patches = grid_t * rows * cols * merge_size * merge_size
        return cls(levels.reshape(channels, num_patches, frames_per_patch, patch_size * patch_size), table,
                   temporal_patch_size)

    @property
    def shape(self) -> tuple[int, int]:
        channels, num_patches, _, pixels = self.levels.shape
        return num_patches, channels * self.temporal_patch_size * pixels

    @property
    def dtype(self) -> np.dtype:
        return self.table.dtype

    def __len__(self) -> int:
        return self.levels.shape[1]

    def __getitem__(self, rows: slice) -> PixelPatches:
        """Patches `rows` (a slice with step 1), still as levels."""
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError(f"PixelPatches can only be sliced by rows with step 1, got {rows!r}")
        return dataclasses.replace(self, levels=self.levels[:, rows])

    def write_into(self, out: np.ndarray) -> None:
        """Writes the patches into out: [N, patch_dim], C-contiguous.

        A float out (float32, or bfloat16 rounded once from the float32 table) receives the
        normalised values; a uint8 out receives the raw levels in the same layout, for
        normalisation on the device (`unite_jax.model.pixels.normalize_levels`).
        """
        channels, num_patches, frames, pixels = self.levels.shape
        if out.shape != self.shape or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous {self.shape}, got {out.shape}")
        by_position = out.reshape(num_patches, channels, self.temporal_patch_size, pixels)
        if out.dtype == np.uint8:
            for channel in range(channels):
                by_position[:, channel] = self.levels[channel]  # broadcasts an image's one frame
            return
        table = self.table if out.dtype == self.table.dtype else self.table.astype(out.dtype)
        # np.take writes fastest into a contiguous buffer; one per frame, then spread to its places.
        normalised = np.empty((num_patches, pixels), out.dtype)
        for channel in range(channels):
            for frame in range(frames):
                np.take(table[channel], self.levels[channel, :, frame], out=normalised, mode="clip")
                if frames == 1:
                    by_position[:, channel, :, :] = normalised[:, None, :]
                else:
                    by_position[:, channel, frame, :] = normalised

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.empty(self.shape, self.table.dtype)
        self.write_into(out)
        return out if dtype is None else out.astype(dtype, copy=False)


def write_patches(out: np.ndarray, patches) -> None:
    """out[...] = patches, for an array or PixelPatches (written straight into out).

    A uint8 out holds pixel levels, which only PixelPatches carry: normalised float patches
    cannot be turned back into levels.
    """
    if isinstance(patches, PixelPatches):
        patches.write_into(out)
    elif out.dtype == np.uint8:
        raise ValueError("a uint8 patch buffer takes PixelPatches (pixel levels), not normalised float patches")
    else:
        out[...] = patches
