"""Pixel levels -> normalised patches on the device.

The training pipeline can ship patches as uint8 levels (`data.patch_dtype="uint8"`): a
quarter of the bytes of float32 to write on the host, hand between processes and copy
to the device. The step normalises them with the processor's lookup table, gathering the
very float32 values the host would have written, so the result is bit-identical.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def normalize_levels(levels: jnp.ndarray, table: np.ndarray | jnp.ndarray) -> jnp.ndarray:
    """uint8 [..., patch_dim] levels -> float32 [..., patch_dim] normalised patches.

    table: float32 [channels, 256] (`unite_jax.data.media.normalize_table`). A patch flattens
    as (channel, temporal, row, col), so column j belongs to channel j // (patch_dim // channels).
    """
    channels = table.shape[0]
    patch_dim = levels.shape[-1]
    if table.shape[1] != 256 or patch_dim % channels:
        raise ValueError(f"normalize_levels: table {table.shape} does not fit patches of {patch_dim} values")
    channel_of_column = jnp.arange(patch_dim, dtype=jnp.int32) // (patch_dim // channels)
    flat_table = jnp.asarray(table, jnp.float32).reshape(-1)
    return flat_table[channel_of_column * 256 + levels.astype(jnp.int32)]


def normalize_stream(stream: dict, table) -> dict:
    """A batch stream whose "patches" may be uint8 levels -> the same stream with float32 patches.

    stream: the embedder's batch keys; patches [..., P, patch_dim], patch_segment_ids [..., P].
    table: as for normalize_levels, or None when the patches are known to be float already.
    """
    patches = stream["patches"]
    if patches.dtype != jnp.uint8:
        return stream
    if table is None:
        raise ValueError("the batch's patches are uint8 pixel levels (data.patch_dtype='uint8') but no pixel "
                         "table was given to normalise them (pass pixel_table=media.normalize_table(processor))")
    # Padding patches (segment -1) hold level 0; zero them as the float32 pipeline does, so the two
    # batch formats give the model the very same input.
    real = (stream["patch_segment_ids"] >= 0)[..., None]
    return dict(stream, patches=jnp.where(real, normalize_levels(patches, table), 0.0))
