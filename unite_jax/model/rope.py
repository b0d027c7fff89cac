"""Rotary position embeddings: 3-section M-RoPE for the LLM, 2-D axial for the vision tower.

Both produce (cos, sin) tables over the full head dim in the "rotate half"
layout: the first and second halves of a head share one angle per frequency.
Angles are computed in float32 (as the reference does) whatever the compute dtype.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def inverse_frequencies(rotary_dim: int, theta: float) -> np.ndarray:
    """[rotary_dim // 2] float32: theta ** (-2k / rotary_dim)."""
    exponents = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)
    return (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)


def mrope_section_index(mrope_section: tuple[int, ...]) -> np.ndarray:
    """[head_dim // 2] int: which position section (0 temporal, 1 height, 2 width) drives each frequency."""
    return np.repeat(np.arange(len(mrope_section)), mrope_section)


def text_rope(position_ids: jnp.ndarray, head_dim: int, theta: float,
              mrope_section: tuple[int, ...]) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin [batch, seq, head_dim] float32 for M-RoPE.

    position_ids: [batch, 3, seq] int (temporal, height, width). With the three
    rows equal this is ordinary 1-D RoPE (UNITE's sequential positions).
    """
    inv_freq = inverse_frequencies(head_dim, theta)  # [hd/2]
    section = mrope_section_index(mrope_section)  # [hd/2]
    positions = position_ids.astype(jnp.float32)[:, section, :]  # [b, hd/2, seq]
    angles = jnp.swapaxes(positions, 1, 2) * inv_freq  # [b, seq, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def vision_rope(patch_positions: jnp.ndarray, head_dim: int, theta: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin [..., patches, head_dim] float32 for the vision tower's 2-D rotary.

    patch_positions: [..., patches, 2] int (row, column). Half of the rotary
    frequencies follow the row index, the other half the column index.
    """
    inv_freq = inverse_frequencies(head_dim // 2, theta)  # [hd/4]
    positions = patch_positions.astype(jnp.float32)
    angles = jnp.concatenate([positions[..., 0:1] * inv_freq, positions[..., 1:2] * inv_freq], axis=-1)
    angles = jnp.concatenate([angles, angles], axis=-1)  # [..., hd]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotates x [..., seq, heads, head_dim] by cos/sin [..., seq, head_dim]; computed in float32."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos[..., None, :] + rotated * sin[..., None, :]
    return out.astype(dtype)
