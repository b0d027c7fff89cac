"""Attention kernels: the windowed block-diagonal form equals dense masked attention; the
jax.nn.dot_product_attention path (used with cuDNN on GPU) agrees with the XLA reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unite_jax.model.attention import causal_padding_mask, dot_product_attention, local_segment_attention, \
    segment_mask


def _packed_segments(rng, n, max_len):
    ids, current = [], 0
    while len(ids) < n:
        length = int(rng.integers(1, max_len + 1))
        ids += [current] * length
        current += 1
    ids = np.asarray(ids[:n], np.int32)
    ids[-int(rng.integers(1, 9)):] = -1  # trailing padding, as the packer leaves it
    return ids


@pytest.mark.parametrize("n,block,window", [(200, 16, 24), (97, 8, 12), (40, 16, 24)])
def test_local_segment_attention_equals_dense(n, block, window):
    rng = np.random.default_rng(n)
    q, k, v = (rng.standard_normal((2, n, 3, 8)).astype(np.float32) for _ in range(3))
    segments = np.stack([_packed_segments(rng, n, window), _packed_segments(rng, n, window)])
    dense = dot_product_attention(q, k, v, segment_mask(segments))
    local = local_segment_attention(q, k, v, segments, window=window, block=block)
    real = segments >= 0  # padding outputs are discarded, only real patches must agree
    np.testing.assert_allclose(np.asarray(local)[real], np.asarray(dense)[real], atol=1e-6, rtol=1e-6)
    # and the gradients agree too (training runs backward through it)
    loss_dense = lambda q: jnp.sum(dot_product_attention(q, k, v, segment_mask(segments)) * real[..., None, None])
    loss_local = lambda q: jnp.sum(local_segment_attention(q, k, v, segments, window=window, block=block)
                                   * real[..., None, None])
    np.testing.assert_allclose(jax.grad(loss_local)(q), jax.grad(loss_dense)(q), atol=1e-5, rtol=1e-5)


def test_local_segment_attention_needs_the_window():
    """A segment longer than the window loses keys: the result must then differ (the bound matters)."""
    rng = np.random.default_rng(0)
    n = 120
    q, k, v = (rng.standard_normal((1, n, 2, 8)).astype(np.float32) for _ in range(3))
    segments = np.zeros((1, n), np.int32)  # one segment of 120 > window
    dense = dot_product_attention(q, k, v, segment_mask(segments))
    local = local_segment_attention(q, k, v, segments, window=20, block=8)
    assert np.abs(np.asarray(local) - np.asarray(dense)).max() > 1e-3


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
