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


def local_segment_attention(query: jnp.ndarray, key: jnp.ndarray, value: jnp.ndarray, segment_ids: jnp.ndarray,
                            *, window: int, block: int = 512, impl: str = "xla") -> jnp.ndarray:
    """Block-diagonal attention over a long packed row without the [n, n] score matrix.

    Segments are contiguous and at most `window` long, so a query block of
    `block` positions only needs the keys within `window` of its edges. Cost is
    O(n * (block + 2 * window)) instead of O(n^2); results equal the dense
    masked attention exactly (every key a query may see is inside its window).

    query, key, value: [batch, n, heads, head_dim]; segment_ids: [batch, n] int.
    """
    batch, n, heads, head_dim = query.shape
    span = block + 2 * window
    if n <= span:
        return dot_product_attention(query, key, value, segment_mask(segment_ids), impl=impl)
    num_blocks = -(-n // block)
    tail = num_blocks * block - n
    # Query padding and key padding get ids no real or padding patch has (-2, -3).
    q = jnp.pad(query, ((0, 0), (0, tail), (0, 0), (0, 0)))
    q_seg = jnp.pad(segment_ids, ((0, 0), (0, tail)), constant_values=-2)
    kv_pad = ((0, 0), (window, window + tail), (0, 0), (0, 0))
    k, v = jnp.pad(key, kv_pad), jnp.pad(value, kv_pad)
    k_seg = jnp.pad(segment_ids, ((0, 0), (window, window + tail)), constant_values=-3)

    def one_block(start):
        qb = jax.lax.dynamic_slice_in_dim(q, start, block, axis=1)
        qs = jax.lax.dynamic_slice_in_dim(q_seg, start, block, axis=1)
        # padded key index `start` is original position start - window
        kb = jax.lax.dynamic_slice_in_dim(k, start, span, axis=1)
        vb = jax.lax.dynamic_slice_in_dim(v, start, span, axis=1)
        ks = jax.lax.dynamic_slice_in_dim(k_seg, start, span, axis=1)
        mask = (qs[:, :, None] == ks[:, None, :])[:, None]
        return dot_product_attention(qb, kb, vb, mask, impl=impl)

    out = jax.lax.map(one_block, jnp.arange(num_blocks) * block)  # [blocks, batch, block, heads, hd]
    out = jnp.moveaxis(out, 0, 1).reshape(batch, num_blocks * block, heads, head_dim)
    return out[:, :n]
