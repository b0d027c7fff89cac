"""TPU attention: JAX's Pallas splash kernels on segment ids, under `shard_map` over the mesh.

Same contract as every attention implementation (notes in model/attention.py):
segment ids say which tokens attend to each other (-1 = padding, which only
attends to padding); text is causal within a segment; vision is block-diagonal
inside tiles of `block` patches that no segment straddles.

- Text: one splash kernel per row with a causal mask and the row's segment ids.
  The causal mask lets the kernel skip every key block above the diagonal, so a
  row costs about half of the dense row^2; a packed row pays that once for all
  its segments, never row^2 per segment.
- Vision: the row is cut into its tiles (exact: no segment crosses a tile) and
  each tile is one kernel call with a full mask and the tile's segment ids, so
  a row costs O(patches x block).
- Grouped-query attention is native to the kernel (key/value heads are indexed
  per query-head group, never copied).
- Lengths are padded up to a multiple of the kernel block (128) with padding
  tokens (segment -1), which real tokens never see.
- The kernel works on one device's data: inside `jax.shard_map` the batch is
  split over the mesh's batch axes and heads over `tensor` (when both the query
  and key/value head counts divide). Outside a mesh it runs as is.
- Off TPU (CPU tests) the kernel runs in Pallas interpret mode: the same kernel
  program, executed by XLA, for value and gradient checks against the XLA path.

The splash kernel does not scale the logits; the query is scaled by
head_dim^-0.5 first, as the XLA path does after the product.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from unite_jax.model.sharding import TENSOR_AXIS, batch_axes, current_mesh, mesh_platform

# Kernel tile (queries x keys) of the forward and both backward kernels; the key block must be a
# multiple of the TPU lane width (128), so every length is padded to a multiple of this.
BLOCK = 128
# Longer rows use bigger query/key tiles (fewer grid steps); each must divide the padded length.
_LARGE_BLOCKS = (512, 256)


def splash_attention(query: jax.Array, key: jax.Array, value: jax.Array, segment_ids: jax.Array, *,
                     causal: bool, block: int | None = None) -> jax.Array:
    """Attention of `query` over `key`/`value` where segment ids match (and causal when asked).

    query: [batch, seq, heads, head_dim]; key, value: [batch, seq, kv_heads, head_dim]
    segment_ids: int32 [batch, seq], -1 = padding.
    block: vision tiles of `block` tokens (seq a multiple of it; no segment straddles a tile), or None.
    Returns [batch, seq, heads, head_dim] in the query's dtype.
    """
    batch, seq, heads, head_dim = query.shape
    if block is not None and block != seq:
        if seq % block:
            raise ValueError(f"packed row of {seq} patches is not a whole number of {block}-patch blocks")
        tiles = batch * (seq // block)
        tile = lambda x: x.reshape(tiles, block, *x.shape[2:])  # noqa: E731
        out = splash_attention(tile(query), tile(key), tile(value), tile(segment_ids), causal=causal)
        return out.reshape(batch, seq, heads, head_dim)

    mesh = current_mesh()
    interpret = mesh_platform(mesh) != "tpu"
    run = functools.partial(_per_device, causal=causal, interpret=interpret)
    if mesh is None or mesh.size == 1:
        return run(query, key, value, segment_ids)
    shape = dict(mesh.shape)
    axes = batch_axes(mesh)
    rows = axes if axes and batch % math.prod(shape[a] for a in axes) == 0 else None
    tensor = shape.get(TENSOR_AXIS, 1)
    head_axis = TENSOR_AXIS if tensor > 1 and heads % tensor == 0 and key.shape[2] % tensor == 0 else None
    qkv_spec = PartitionSpec(rows, None, head_axis, None)
    return jax.shard_map(run, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, PartitionSpec(rows, None)),
                         out_specs=qkv_spec, check_vma=False)(query, key, value, segment_ids)


def _per_device(query, key, value, segment_ids, *, causal: bool, interpret: bool):
    """The kernel over one device's rows: [b, s, h, d] -> [b, s, h, d]."""
    _, seq, heads, head_dim = query.shape
    padded = -(-seq // BLOCK) * BLOCK
    if padded != seq:
        # trailing padding tokens: after every real token, so causal rows never reach them, and their
        # segment (-1) matches no real segment
        pad = ((0, 0), (0, padded - seq), (0, 0), (0, 0))
        query, key, value = (jnp.pad(x, pad) for x in (query, key, value))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, padded - seq)), constant_values=-1)
    kernel = _kernel(padded, heads, causal, interpret)
    scale = jnp.asarray(head_dim ** -0.5, jnp.float32)
    q = (query.astype(jnp.float32) * scale).astype(query.dtype)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [b, s, h, d] -> [b, h, s, d]
    one_row = lambda q, k, v, ids: kernel(q, k, v, segment_ids=splash.SegmentIds(q=ids, kv=ids))  # noqa: E731
    out = jax.vmap(one_row)(heads_first(q), heads_first(key), heads_first(value), segment_ids.astype(jnp.int32))
    return jnp.swapaxes(out, 1, 2)[:, :seq].astype(query.dtype)


@functools.lru_cache(maxsize=64)
def _kernel(seq: int, heads: int, causal: bool, interpret: bool):
    """A splash kernel for rows of `seq` tokens (a multiple of BLOCK) and `heads` query heads."""
    one = splash.CausalMask((seq, seq)) if causal else splash.FullMask((seq, seq))
    block = next((b for b in _LARGE_BLOCKS if seq % b == 0), BLOCK)
    # one fused backward kernel (dq, dk, dv together): the scores are recomputed once, not twice
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, use_fused_bwd_kernel=True)
    # concrete mask tables even when first built inside a trace (the kernel is cached across traces)
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(splash.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1,
                                      q_seq_shards=1, interpret=interpret)
