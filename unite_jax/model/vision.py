"""Qwen2-VL vision tower over packed rows of patches.

A row holds the patches of several images and videos (one row per data
shard). Every (media, temporal slice) has its own segment id, and attention is
block-diagonal over segments, so packing never lets two images see each other.
Patches arrive in merge-window order, so the 2x2 merger is a reshape.
"""

from __future__ import annotations

import jax.numpy as jnp

from unite_jax.model.attention import attention
from unite_jax.model.config import ModelConfig
from unite_jax.model.layers import activation, layer_norm, linear, scan_layers
from unite_jax.model.options import RunOptions
from unite_jax.model.rope import apply_rope, vision_rope
from unite_jax.model.sharding import constrain_batch


def vision_block(x: jnp.ndarray, p: dict, cos: jnp.ndarray, sin: jnp.ndarray, segment_ids: jnp.ndarray,
                 cfg: ModelConfig, run: RunOptions) -> jnp.ndarray:
    """One pre-norm ViT block. x: [rows, patches, embed_dim]."""
    v = cfg.vision
    dtype = x.dtype
    rows, n, _ = x.shape
    h = layer_norm(x, p["norm1"], v.layer_norm_eps)
    qkv = linear(h, p["attn"]["qkv"], dtype).reshape(rows, n, 3, v.num_heads, v.head_dim)
    q, k, val = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    attn = attention(q, k, val, segment_ids, causal=False, impl=run.attention_impl, block=run.vision_block or n)
    attn = attn.reshape(rows, n, v.embed_dim)
    x = x + linear(attn, p["attn"]["proj"], dtype)
    h = layer_norm(x, p["norm2"], v.layer_norm_eps)
    h = activation(v.hidden_act)(linear(h, p["mlp"]["fc1"], dtype))
    return x + linear(h, p["mlp"]["fc2"], dtype)


def patch_merger(x: jnp.ndarray, p: dict, cfg: ModelConfig) -> jnp.ndarray:
    """LayerNorm, fuse each 2x2 window (contiguous in merge-window order), 2-layer GELU MLP.

    x: [rows, patches, embed_dim] -> [rows, patches / 4, out_hidden]
    """
    v = cfg.vision
    dtype = x.dtype
    rows, n, e = x.shape
    h = layer_norm(x, p["ln_q"], v.layer_norm_eps).reshape(rows, n // v.merge_unit, e * v.merge_unit)
    h = activation("gelu")(linear(h, p["mlp"]["0"], dtype))
    return linear(h, p["mlp"]["2"], dtype)


def vision_tower(params: dict, patches: jnp.ndarray, segment_ids: jnp.ndarray, patch_positions: jnp.ndarray,
                 cfg: ModelConfig, run: RunOptions) -> jnp.ndarray:
    """Packed patches -> merged visual tokens.

    patches: [rows, patches, C*T*P*P] (pixel values, any float dtype)
    segment_ids: [rows, patches] int32, one id per (media, temporal slice); -1 = padding.
        Segments never straddle a block of `run.vision_block` patches (the packer's layout).
    patch_positions: [rows, patches, 2] int32, (row, column) of each patch in its image
    Returns [rows, patches / 4, llm_hidden] in the compute dtype.
    """
    v = cfg.vision
    dtype = jnp.dtype(run.compute_dtype)
    if patches.shape[1] % v.merge_unit:
        raise ValueError(f"patch rows must hold a multiple of {v.merge_unit} patches, got {patches.shape[1]}")
    # Conv3d with kernel == stride over a flattened patch is a single matmul.
    x = linear(patches, params["patch_embed"]["proj"], dtype)
    cos, sin = vision_rope(patch_positions, v.head_dim, v.rope_theta)

    def body(carry, layer_params):
        # rows (one per data shard) stay split over the batch axes (model/sharding.py)
        return constrain_batch(vision_block(constrain_batch(carry), layer_params, cos, sin, segment_ids, cfg, run))

    x = scan_layers(body, constrain_batch(x), params["blocks"], remat=run.remat, use_scan=run.scan_layers)
    return constrain_batch(patch_merger(x, params["merger"], cfg))
