"""Attention kernels: the tiled block-diagonal form equals dense masked attention; the
jax.nn.dot_product_attention path (used with cuDNN on GPU) agrees with the XLA reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unite_jax.model.attention import (
    blocked_segment_attention,
    causal_padding_mask,
    dot_product_attention,
    segment_mask,
)


def _tiled_segments(rng, n, block):
    """Segments packed tile by tile (none straddles a tile), with padding (-1) at each tile's end."""
    ids, current = [], 0
    for _ in range(n // block):
        used = 0
        while True:
            length = int(rng.integers(1, block // 2 + 1))
            if used + length > block:
                break
            ids += [current] * length
            used += length
            current += 1
        ids += [-1] * (block - used)
    return np.asarray(ids, np.int32)


@pytest.mark.parametrize("n,block", [(192, 16), (96, 32), (40, 40)])
def test_blocked_segment_attention_equals_dense(n, block):
    rng = np.random.default_rng(n)
    q, k, v = (rng.standard_normal((2, n, 3, 8)).astype(np.float32) for _ in range(3))
    segments = np.stack([_tiled_segments(rng, n, block), _tiled_segments(rng, n, block)])
    dense = dot_product_attention(q, k, v, segment_mask(segments))
    tiled = blocked_segment_attention(q, k, v, segments, block=block)
    real = segments >= 0  # padding outputs are discarded, only real patches must agree
    np.testing.assert_allclose(np.asarray(tiled)[real], np.asarray(dense)[real], atol=1e-6, rtol=1e-6)
    # and the gradients agree too (training runs backward through it)
    loss_dense = lambda q: jnp.sum(dot_product_attention(q, k, v, segment_mask(segments)) * real[..., None, None])
    loss_tiled = lambda q: jnp.sum(blocked_segment_attention(q, k, v, segments, block=block) * real[..., None, None])
    np.testing.assert_allclose(jax.grad(loss_tiled)(q), jax.grad(loss_dense)(q), atol=1e-5, rtol=1e-5)


def test_blocked_segment_attention_cuts_segments_that_straddle_tiles():
    """The tiling is only exact for the packer's layout: a segment across a tile border loses keys."""
    rng = np.random.default_rng(0)
    n = 64
    q, k, v = (rng.standard_normal((1, n, 2, 8)).astype(np.float32) for _ in range(3))
    segments = np.zeros((1, n), np.int32)
    dense = dot_product_attention(q, k, v, segment_mask(segments))
    tiled = blocked_segment_attention(q, k, v, segments, block=16)
    assert np.abs(np.asarray(tiled) - np.asarray(dense)).max() > 1e-3
    with pytest.raises(ValueError, match="whole number of 24-patch blocks"):
        blocked_segment_attention(q, k, v, segments, block=24)


def test_gqa_and_causal_padding_match_jax_dot_product_attention():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 10, 6, 16)).astype(np.float32)
    k, v = (rng.standard_normal((2, 10, 2, 16)).astype(np.float32) for _ in range(2))
    attention_mask = np.ones((2, 10), np.int32)
    attention_mask[0, :4] = 0
    mask = causal_padding_mask(attention_mask)
    ours = dot_product_attention(q, k, v, mask)
    theirs = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    valid = attention_mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[valid], np.asarray(theirs)[valid], atol=1e-5, rtol=1e-5)
    # an explicit numpy reference of one head with GQA grouping (query head 5 uses kv head 5 // 3 = 1)
    b, qi, head = 0, 7, 5
    keys = np.flatnonzero(np.asarray(mask)[b, 0, qi])
    scores = k[b, keys, 1] @ q[b, qi, head] / 4.0
    weights = np.exp(scores - scores.max())
    weights /= weights.sum()
    np.testing.assert_allclose(np.asarray(ours)[b, qi, head], weights @ v[b, keys, 1], atol=1e-5, rtol=1e-5)


def test_query_chunked_attention_equals_unchunked(monkeypatch):
    """Long query rows run in rematerialised chunks; values and gradients are unchanged."""
    from unite_jax.model import attention

    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 100, 4, 8)).astype(np.float32)
    k, v = (rng.standard_normal((2, 100, 2, 8)).astype(np.float32) for _ in range(2))
    attention_mask = np.ones((2, 100), np.int32)
    attention_mask[1, :37] = 0
    mask = causal_padding_mask(attention_mask)
    loss = lambda q, k: jnp.sum(dot_product_attention(q, k, v, mask) ** 2 * attention_mask[..., None, None])
    expected, expected_grad = loss(q, k), jax.grad(loss, argnums=(0, 1))(q, k)
    monkeypatch.setattr(attention, "QUERY_CHUNK_THRESHOLD", 16)
    monkeypatch.setattr(attention, "QUERY_CHUNK", 24)  # 100 = 4 chunks + padding
    np.testing.assert_allclose(loss(q, k), expected, rtol=1e-6)
    for got, want in zip(jax.grad(loss, argnums=(0, 1))(q, k), expected_grad):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
