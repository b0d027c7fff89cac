"""One attention function with selectable implementation.

- `xla`: plain einsum + float32 softmax. Runs everywhere; the reference of the tests.
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, the fused
  GPU kernel (needs bf16/fp16 inputs).

Masks are boolean, True = may attend. Grouped-query attention is handled by
grouping query heads over the shared key/value heads, never by copying K/V.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -1e30  # finite: a fully masked row gives a uniform softmax instead of NaN


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
    batch, q_len, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    groups = heads // kv_heads
    q = query.reshape(batch, q_len, kv_heads, groups, head_dim)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", q, key, preferred_element_type=jnp.float32)
    logits = logits * (head_dim ** -0.5)
    if mask is not None:
        mask = jnp.broadcast_to(mask, (batch, 1, q_len, key.shape[1]))[:, :, None]  # [b, 1, 1, q, s]
        logits = jnp.where(mask, logits, _MASKED)
    weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", weights, value, preferred_element_type=jnp.float32)
    return out.reshape(batch, q_len, heads, head_dim).astype(query.dtype)


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
                              *, block: int, impl: str = "xla") -> jnp.ndarray:
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
    out = dot_product_attention(tile(query), tile(key), tile(value), segment_mask(tile(segment_ids)), impl=impl)
    return out.reshape(batch, n, heads, head_dim)
