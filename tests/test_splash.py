"""The splash (TPU Pallas) attention path equals the XLA path, in Pallas interpret mode on CPU.

float32, values and gradients of q, k and v, with GQA, segment ids (several segments per row, as
packed rows have) and left padding; text causal, vision block-diagonal in tiles; on one device and
under shard_map over the 8-device mesh (batch over data/fsdp, heads over tensor). Padding outputs
are never read by the model, so only real-token positions are compared.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unite_jax import parallel
from unite_jax.model.attention import attention
from unite_jax.model.sharding import activation_mesh

TOL = dict(atol=2e-5, rtol=2e-5)


def _text_segments(rng, batch, seq):
    """Left padding, then 1-3 segments per row (ids 0, 1, 2): today's layout and a packed one."""
    rows = []
    for _ in range(batch):
        pad = int(rng.integers(0, seq // 3))
        cuts = np.sort(rng.choice(np.arange(pad + 1, seq), size=int(rng.integers(0, 3)), replace=False))
        ids = np.full(seq, -1, np.int32)
        for s, (a, b) in enumerate(zip([pad, *cuts], [*cuts, seq], strict=True)):
            ids[a:b] = s
        rows.append(ids)
    return np.stack(rows)


def _vision_segments(rng, batch, seq, block):
    """Segments packed tile by tile (none straddles a tile), padding (-1) at each tile's end."""
    rows = []
    for _ in range(batch):
        ids, current = [], 0
        for _ in range(seq // block):
            used = 0
            while True:
                length = int(rng.integers(4, block // 2 + 1))
                if used + length > block:
                    break
                ids += [current] * length
                used, current = used + length, current + 1
            ids += [-1] * (block - used)
        rows.append(ids)
    return np.asarray(rows, np.int32)


def _qkv(rng, batch, seq, heads, kv_heads, dim):
    q = rng.standard_normal((batch, seq, heads, dim)).astype(np.float32)
    k, v = (rng.standard_normal((batch, seq, kv_heads, dim)).astype(np.float32) for _ in range(2))
    return q, k, v


def _loss_and_grads(impl, q, k, v, segments, causal, block):
    real = jnp.asarray(segments >= 0)[..., None, None]
    weights = jnp.asarray(np.random.default_rng(5).standard_normal(q.shape).astype(np.float32))

    def loss(q, k, v):
        out = attention(q, k, v, jnp.asarray(segments), causal=causal, impl=impl, block=block)
        return jnp.sum(jnp.where(real, out * weights, 0.0)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def _check(q, k, v, segments, causal, block):
    out_x, grads_x = _loss_and_grads("xla", q, k, v, segments, causal, block)
    out_s, grads_s = _loss_and_grads("splash", q, k, v, segments, causal, block)
    real = segments >= 0
    np.testing.assert_allclose(np.asarray(out_s)[real], np.asarray(out_x)[real], **TOL)
    for name, gs, gx in zip("qkv", grads_s, grads_x, strict=True):
        np.testing.assert_allclose(np.asarray(gs), np.asarray(gx), err_msg=f"d{name}", **TOL)


@pytest.mark.parametrize("seq,heads,kv_heads", [(256, 4, 2), (200, 6, 1)])
def test_text_causal_segments_gqa_padding(seq, heads, kv_heads):
    """seq 200 is padded to the kernel's 256 inside; 6 heads over 1 KV head is GQA at its extreme."""
    rng = np.random.default_rng(seq)
    q, k, v = _qkv(rng, 2, seq, heads, kv_heads, 16)
    _check(q, k, v, _text_segments(rng, 2, seq), causal=True, block=None)


def test_vision_block_diagonal_tiles():
    rng = np.random.default_rng(1)
    seq, block = 256, 64  # tiles of 64 patches, each padded to the kernel's 128 inside
    q, k, v = _qkv(rng, 2, seq, 4, 4, 16)
    _check(q, k, v, _vision_segments(rng, 2, seq, block), causal=False, block=block)


def test_under_shard_map_on_the_mesh():
    """Batch over (data, fsdp) = 4 shards, heads over tensor = 2: the same numbers as one device."""
    mesh = parallel.make_mesh((2, 2, 2))
    rng = np.random.default_rng(2)
    q, k, v = _qkv(rng, 4, 128, 4, 2, 16)
    segments = _text_segments(rng, 4, 128)
    out_x, grads_x = _loss_and_grads("xla", q, k, v, segments, True, None)
    with activation_mesh(mesh):
        out_s, grads_s = _loss_and_grads("splash", q, k, v, segments, True, None)
    real = segments >= 0
    np.testing.assert_allclose(np.asarray(out_s)[real], np.asarray(out_x)[real], **TOL)
    for gs, gx in zip(grads_s, grads_x, strict=True):
        np.testing.assert_allclose(np.asarray(gs), np.asarray(gx), **TOL)


def test_splash_sees_segments():
    """Not a vacuous comparison: ignoring the segment ids changes the splash result."""
    rng = np.random.default_rng(3)
    q, k, v = _qkv(rng, 1, 128, 2, 2, 16)
    segments = np.zeros((1, 128), np.int32)
    segments[0, 64:] = 1
    split = attention(q, k, v, jnp.asarray(segments), causal=True, impl="splash")
    whole = attention(q, k, v, jnp.zeros((1, 128), jnp.int32), causal=True, impl="splash")
    assert float(jnp.abs(split[:, 64:] - whole[:, 64:]).max()) > 1e-2
    np.testing.assert_allclose(np.asarray(split[:, :64]), np.asarray(whole[:, :64]), **TOL)
