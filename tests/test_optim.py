"""Learning-rate schedule, clipping and AdamW (unite_jax.train.optim) against numpy written from the formulas.

The references follow transformers' get_cosine_schedule_with_warmup and
torch.optim.AdamW (decoupled decay) as stated in UNITE.md's recipe; none of
them calls the code under test.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unite_jax.train import optim


def reference_lr(step, peak, total, warmup_fraction, end_fraction=0.0):
    """transformers' lr_lambda (num_cycles = 0.5) times peak, with a floor at end_fraction * peak."""
    warmup = math.ceil(warmup_fraction * total)
    if step < warmup:
        return peak * step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    end = end_fraction * peak
    return end + (peak - end) * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def test_schedule_against_closed_form():
    peak, total = 1e-4, 1000  # warmup = ceil(30.0) = 30
    schedule = optim.learning_rate_schedule(peak, total)
    for step in (0, 1, 15, 29, 30, 31, 515, 999, 1000, 1500):
        assert float(schedule(step)) == pytest.approx(reference_lr(step, peak, total, 0.03), rel=1e-5, abs=1e-12)
    assert float(schedule(0)) == 0.0
    assert float(schedule(30)) == pytest.approx(peak, rel=1e-6)
    assert float(schedule(515)) == pytest.approx(peak / 2, rel=1e-5)  # half way through the decay
    assert float(schedule(1000)) == pytest.approx(0.0, abs=1e-12)
    assert float(schedule(1500)) == pytest.approx(0.0, abs=1e-12)  # stays at the end value


def test_schedule_rounds_warmup_up_and_end_fraction():
    peak, total = 2e-5, 101  # 0.03 * 101 = 3.03 -> 4 warmup steps
    assert optim.warmup_steps(total, 0.03) == 4
    schedule = optim.learning_rate_schedule(peak, total, end_fraction=0.1)
    assert float(schedule(3)) == pytest.approx(peak * 3 / 4, rel=1e-6)
    assert float(schedule(4)) == pytest.approx(peak, rel=1e-6)
    for step in (2, 4, 50, 100, 101, 200):
        assert float(schedule(step)) == pytest.approx(reference_lr(step, peak, total, 0.03, 0.1), rel=1e-5)
    assert float(schedule(101)) == pytest.approx(0.1 * peak, rel=1e-5)
    # jit-able with a traced count, float32
    values = jax.jit(jax.vmap(schedule))(jnp.arange(5))
    assert values.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(values), [peak * s / 4 if s < 4 else peak for s in range(5)], rtol=1e-6)


def test_schedule_without_warmup_starts_at_peak():
    schedule = optim.learning_rate_schedule(1.0, 10, warmup_fraction=0.0)
    assert float(schedule(0)) == pytest.approx(1.0)
    assert float(schedule(5)) == pytest.approx(0.5, rel=1e-6)


@pytest.mark.parametrize("kwargs", [dict(total_steps=0), dict(total_steps=10.0), dict(warmup_fraction=1.0),
                                    dict(warmup_fraction=-0.1), dict(end_fraction=1.5), dict(peak=-1.0)])
def test_schedule_rejects_bad_arguments(kwargs):
    args = dict(peak=1e-4, total_steps=100) | kwargs
    with pytest.raises(ValueError):
        optim.learning_rate_schedule(**args)


def test_global_norm():
    tree = {"a": np.array([3.0, 4.0], np.float32), "b": {"c": np.full((2, 2), 1.0, np.float32)},
            "d": jnp.array([2.0], jnp.bfloat16)}
    assert float(optim.global_norm(tree)) == pytest.approx(math.sqrt(9 + 16 + 4 + 4))
    assert optim.global_norm(tree).dtype == jnp.float32
    assert float(optim.global_norm({})) == 0.0


def test_clip_by_global_norm():
    clip = optim.clip_by_global_norm(1.0)
    grads = {"w": np.array([300.0, -400.0], np.float32), "b": np.array([0.0], np.float32)}
    clipped, _ = clip.update(grads, clip.init(grads))
    np.testing.assert_allclose(np.asarray(clipped["w"]), [0.6, -0.8], rtol=1e-6)
    small = {"w": np.array([0.3, 0.4], np.float32), "b": np.array([0.1], np.float32)}
    kept, _ = clip.update(small, clip.init(small))
    np.testing.assert_array_equal(np.asarray(kept["w"]), small["w"])


def numpy_adamw(params, grads_per_step, *, peak, total, warmup_fraction, weight_decay, b1, b2, eps, clip_norm):
    """Clip by global norm (torch-like without the 1e-6), then torch.optim.AdamW, float64."""
    p = {k: np.asarray(v, np.float64).copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, grads in enumerate(grads_per_step, start=1):
        g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
        if clip_norm > 0:
            norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
            if norm > clip_norm:
                g = {k: x * clip_norm / norm for k, x in g.items()}
        lr = reference_lr(t - 1, peak, total, warmup_fraction)  # the t-th update uses lr(t - 1)
        for k in p:
            p[k] = p[k] * (1 - lr * weight_decay)  # torch: decay first, on the old value
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            m_hat = m[k] / (1 - b1**t)
            v_hat = v[k] / (1 - b2**t)
            p[k] = p[k] - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


@pytest.mark.parametrize("clip_norm", [1.0, 0.0])
def test_optimizer_matches_numpy_adamw(clip_norm):
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal(5).astype(np.float32), "b": rng.standard_normal(2).astype(np.float32)}
    grads = [
        {"w": rng.standard_normal(5).astype(np.float32) * 1e3, "b": np.array([5e2, -1e3], np.float32)},  # clipped
        {"w": rng.standard_normal(5).astype(np.float32) * 0.1, "b": np.array([0.05, 0.02], np.float32)},  # not
        {"w": rng.standard_normal(5).astype(np.float32) * 3.0, "b": np.array([1.0, -2.0], np.float32)},  # clipped
        {"w": rng.standard_normal(5).astype(np.float32) * 0.2, "b": np.array([0.1, 0.3], np.float32)},
    ]
    settings = dict(peak=0.1, total=6, warmup_fraction=0.3, weight_decay=0.05, b1=0.9, b2=0.95, eps=1e-6)
    tx, schedule = optim.make_optimizer(settings["peak"], settings["total"], warmup_fraction=0.3,
                                        weight_decay=0.05, b1=0.9, b2=0.95, eps=1e-6, clip_norm=clip_norm)
    state = tx.init(params)
    current = {k: jnp.asarray(v) for k, v in params.items()}
    step = jax.jit(tx.update)
    for g in grads:
        updates, state = step(g, state, current)
        current = optax.apply_updates(current, updates)
    expected = numpy_adamw(params, grads, clip_norm=clip_norm, **settings)
    for k in params:
        np.testing.assert_allclose(np.asarray(current[k]), expected[k], rtol=2e-5, atol=1e-6)
    # warmup = ceil(1.8) = 2: lr(0) = 0, lr(1) = peak / 2, lr(2) = peak
    np.testing.assert_allclose([float(schedule(s)) for s in range(3)], [0.0, 0.05, 0.1], rtol=1e-6)


def test_clipping_changes_the_result():
    """The two parametrisations above differ: the huge first gradient really is clipped."""
    params = {"w": np.array([1.0, -1.0], np.float32)}
    grads = [{"w": np.array([1e3, 1e3], np.float32)}, {"w": np.array([1.0, -0.5], np.float32)}]
    results = []
    for clip_norm in (1.0, 0.0):
        tx, _ = optim.make_optimizer(0.1, 4, warmup_fraction=0.0, clip_norm=clip_norm)
        state, current = tx.init(params), params
        for g in grads:
            updates, state = tx.update(g, state, current)
            current = optax.apply_updates(current, updates)
        results.append(np.asarray(current["w"]))
    assert not np.allclose(results[0], results[1], rtol=1e-3)


def test_weight_decay_mask():
    params = {"w": np.array([2.0], np.float32), "norm": np.array([2.0], np.float32)}
    zero = {k: np.zeros_like(v) for k, v in params.items()}
    tx, schedule = optim.make_optimizer(0.5, 10, warmup_fraction=0.0, weight_decay=0.1,
                                        mask={"w": True, "norm": False})
    updates, _ = tx.update(zero, tx.init(params), params)
    # zero gradient: the Adam term is 0, only decoupled decay lr * wd * p acts on masked leaves (lr(0) = 0.5)
    np.testing.assert_allclose(np.asarray(updates["w"]), [-0.5 * 0.1 * 2.0], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(updates["norm"]), [0.0])
    assert float(schedule(0)) == 0.5
