"""One attention function with selectable implementation.

- `xla`: plain einsum + float32 softmax. Runs everywhere; the reference of the tests.
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, the fused
  GPU kernel (needs bf16/fp16 inputs).
- `splash`: JAX's Pallas splash kernels on TPU (model/splash.py), under
  `shard_map` over the mesh; Pallas interpret mode elsewhere (tests).

`attention` is the one entry point of the model: segment ids say which tokens
attend to each other (int32, -1 = padding, which attends only to padding);
text is causal within a segment, vision block-diagonal inside tiles. Masks
below are boolean, True = may attend. Grouped-query attention is handled by
grouping query heads over the shared key/value heads, never by copying K/V.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -1e30  # finite: a fully masked row gives a uniform softmax instead of NaN
# Queries longer than this are processed in chunks of QUERY_CHUNK rows, each rematerialised in the
# backward pass, so the XLA path never holds more than [heads, QUERY_CHUNK, kv_len] scores at once.
QUERY_CHUNK_THRESHOLD = 2048
QUERY_CHUNK = 1024


def attention(query: jnp.ndarray, key: jnp.ndarray, value: jnp.ndarray, segment_ids: jnp.ndarray, *,
              causal: bool, impl: str = "xla", block: int | None = None) -> jnp.ndarray:
    """Self-attention within segments.

    query: [batch, seq, heads, head_dim]; key, value: [batch, seq, kv_heads, head_dim]
    segment_ids: int32 [batch, seq]; equal ids attend to each other, -1 = padding.
    causal: a token sees only earlier positions of its segment (text).
    block: tiles of `block` tokens that no segment straddles (vision); attention is computed tile by
        tile, O(seq * block). None = one tile per row.
    Returns [batch, seq, heads, head_dim] in the query's dtype.
    """
    if impl == "splash":
        from unite_jax.model.splash import splash_attention

        return splash_attention(query, key, value, segment_ids, causal=causal, block=block)
    if block is not None and block != query.shape[1]:
        return blocked_segment_attention(query, key, value, segment_ids, block=block, impl=impl, causal=causal)
    mask = segment_mask(segment_ids)
    if causal:
        seq = segment_ids.shape[-1]
        mask = mask & jnp.tril(jnp.ones((seq, seq), dtype=bool))[None, None]
    return dot_product_attention(query, key, value, mask, impl=impl)


def padding_segment_ids(attention_mask: jnp.ndarray) -> jnp.ndarray:
    """int32 [batch, seq] segment ids of rows holding one input: 0 = token, -1 = (left) padding.

    attention_mask: [batch, seq] (1 = token, 0 = padding).
    """
    return jnp.where(attention_mask.astype(bool), 0, -1).astype(jnp.int32)


def dot_product_attention(query: jnp.ndarray, key: jnp.ndarray, value: jnp.ndarray, mask: jnp.ndarray | None,
                          *, impl: str = "xla") -> jnp.ndarray:
    """Scaled dot-product attention.

    query: [batch, q_len, heads, head_dim]; key, value: [batch, kv_len, kv_heads, head_dim]
    mask: bool, broadcastable to [batch, 1, q_len, kv_len] (or None).
    Returns [batch, q_len, heads, head_dim] in the query's dtype.
    """
    if impl == "cudnn":
        return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation="cudnn")
    if impl != "xla":
        raise ValueError(f"unknown attention implementation {impl!r}")
    if query.shape[1] > QUERY_CHUNK_THRESHOLD:
        return _query_chunked(query, key, value, mask)
    return _xla_attention(query, key, value, mask)


def _query_chunked(query, key, value, mask):
    """The XLA attention over chunks of queries (memory O(chunk * kv_len) per head, forward and backward)."""
    batch, q_len, heads, head_dim = query.shape
    chunks = -(-q_len // QUERY_CHUNK)
    pad = chunks * QUERY_CHUNK - q_len
    q = jnp.pad(query, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q = jnp.moveaxis(q.reshape(batch, chunks, QUERY_CHUNK, heads, head_dim), 1, 0)
    if mask is None:
        mask = jnp.ones((batch, 1, q_len, key.shape[1]), bool)
    mask = jnp.broadcast_to(mask, (batch, 1, q_len, key.shape[1]))
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=True)
    mask = jnp.moveaxis(mask.reshape(batch, 1, chunks, QUERY_CHUNK, key.shape[1]), 2, 0)
    body = jax.checkpoint(lambda args: _xla_attention(args[0], key, value, args[1]))
    out = jax.lax.map(body, (q, mask))  # [chunks, batch, chunk, heads, head_dim]
    return jnp.moveaxis(out, 0, 1).reshape(batch, chunks * QUERY_CHUNK, heads, head_dim)[:, :q_len]


def _xla_attention(query, key, value, mask):
    batch, q_len, heads, head_dim = query.shape
    kv_len, kv_heads = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    # Lay the query heads of each KV group along the rows, so both products are plain batched
    # GEMMs over (batch, kv_head) in the forward and the backward pass.
    q = query.reshape(batch, q_len, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    q = q.reshape(batch, kv_heads, groups * q_len, head_dim)
    k, v = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)  # [b, kv, s, d]
    logits = jnp.matmul(q, k.swapaxes(-1, -2), preferred_element_type=jnp.float32)
    logits = logits.reshape(batch, kv_heads, groups, q_len, kv_len) * (head_dim ** -0.5)
    if mask is not None:
        mask = jnp.broadcast_to(mask, (batch, 1, q_len, kv_len))[:, :, None]  # [b, 1, 1, q, s]
        logits = jnp.where(mask, logits, _MASKED)
    weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype).reshape(batch, kv_heads, groups * q_len, kv_len)
    out = jnp.matmul(weights, v, preferred_element_type=jnp.float32).reshape(batch, kv_heads, groups, q_len, head_dim)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, heads, head_dim).astype(query.dtype)


def causal_padding_mask(attention_mask: jnp.ndarray) -> jnp.ndarray:
    """[batch, 1, seq, seq] bool: causal, and keys restricted to real (non-pad) tokens.

    attention_mask: [batch, seq] (1 = token, 0 = left padding).
    """
    seq = attention_mask.shape[-1]
    causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
    return causal[None, None] & attention_mask.astype(bool)[:, None, None, :]


def segment_mask(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """[batch, 1, n, n] bool: block-diagonal mask, a position attends only to its own segment.

    segment_ids: [batch, n] int. Padding carries -1 and attends only to other padding
    (its output is discarded), which keeps every row of the softmax well defined.
    """
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def blocked_segment_attention(query: jnp.ndarray, key: jnp.ndarray, value: jnp.ndarray, segment_ids: jnp.ndarray,
                              *, block: int, impl: str = "xla", causal: bool = False) -> jnp.ndarray:
    """Block-diagonal attention over a packed row whose segments never straddle a block.

    The packer places every (media, temporal slice) inside one block of `block`
    patches, so attention is dense within [block, block] tiles and nothing is
    computed across them: cost O(n * block) instead of O(n^2), exact.

    query, key, value: [batch, n, heads, head_dim] with n a multiple of block; segment_ids: [batch, n].
    """
    batch, n, heads, head_dim = query.shape
    if n % block:
        raise ValueError(f"packed row of {n} patches is not a whole number of {block}-patch blocks")
    tiles = batch * (n // block)
    tile = lambda x: x.reshape(tiles, block, *x.shape[2:])
    mask = segment_mask(tile(segment_ids))
    if causal:
        mask = mask & jnp.tril(jnp.ones((block, block), dtype=bool))[None, None]
    out = dot_product_attention(tile(query), tile(key), tile(value), mask, impl=impl)
    return out.reshape(batch, n, heads, head_dim)
