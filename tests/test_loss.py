"""MAMCL loss (dense, chunked, jit-sharded, shard_map) and GradCache.

The reference below is written from the formula in UNITE.md ("Loss") with
plain numpy loops in float64; it does not call the code under test. Gradients
are checked against central finite differences of that reference.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from loss_references import mamcl_loss_sharded, strided_embed_in_chunks, strided_gradcache_value_and_grad

from unite_jax import gradcache
from unite_jax import loss as loss_lib
from unite_jax.loss import mamcl_loss

CODES = np.array([1, 2, 4, 3, 5])


# ----------------------------------------------------------------------------
# Independent reference


def _logsumexp(values):
    values = np.asarray(values, np.float64)
    top = values.max()
    return top + np.log(np.sum(np.exp(values - top)))


def reference_loss(query, candidate, modality, *, temperature, mask, symmetric, hard_negative=None,
                   hard_negative_modality=None, valid=None):
    """MAMCL by the definition, one row at a time, float64."""
    batch = query.shape[0]
    valid = np.ones(batch, bool) if valid is None else np.asarray(valid, bool)
    columns, column_modality, column_valid = list(candidate), list(modality), list(valid)
    if hard_negative is not None:
        negatives = hard_negative if hard_negative.ndim == 3 else hard_negative[:, None, :]
        negative_modality = np.reshape(hard_negative_modality, negatives.shape[:2])
        for row in range(batch):
            for k in range(negatives.shape[1]):
                columns.append(negatives[row, k])
                column_modality.append(negative_modality[row, k])
                column_valid.append(valid[row] and negative_modality[row, k] != 0)  # 0 = no negative
    rows = [i for i in range(batch) if valid[i]]
    if not rows:
        return 0.0
    q2c = 0.0
    for i in rows:
        logits = [query[i] @ columns[j] / temperature for j in range(len(columns))
                  if j == i or (column_valid[j] and (not mask or column_modality[j] == modality[i]))]
        q2c += _logsumexp(logits) - query[i] @ candidate[i] / temperature
    q2c /= len(rows)
    if not symmetric:
        return q2c
    c2q = 0.0
    for i in rows:
        logits = [candidate[i] @ query[j] / temperature for j in range(batch) if j == i or valid[j]]
        c2q += _logsumexp(logits) - candidate[i] @ query[i] / temperature
    c2q /= len(rows)
    return (q2c + c2q) / 2


def finite_difference(fn, arrays, eps=1e-6):
    """Central differences of scalar fn(*arrays) with respect to every entry of every array (float64)."""
    grads = []
    for index, array in enumerate(arrays):
        grad = np.zeros_like(array)
        for position in np.ndindex(array.shape):
            plus = [a.copy() for a in arrays]
            minus = [a.copy() for a in arrays]
            plus[index][position] += eps
            minus[index][position] -= eps
            grad[position] = (fn(*plus) - fn(*minus)) / (2 * eps)
        grads.append(grad)
    return grads


def normalised(rng, *shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_batch(seed, batch=6, dim=4, negatives=None, with_valid=False, codes=CODES, positive_noise=1.0):
    """Random normalised float64 embeddings and modality codes; negatives: None, 0 ([B, D]) or K ([B, K, D])."""
    rng = np.random.default_rng(seed)
    query = normalised(rng, batch, dim)
    # Positives near their queries (cosine ~0.7), as after some training: accuracy is then informative.
    candidate = query + positive_noise * normalised(rng, batch, dim)
    batch_data = {
        "query": query,
        "candidate": candidate / np.linalg.norm(candidate, axis=-1, keepdims=True),
        # Two codes for the positives, so that most rows have same-modality negatives; hard negatives
        # also take a third code that no row matches (masked for everyone).
        "modality": rng.choice(codes[:2], size=batch),
    }
    if negatives == 0:
        batch_data["hard_negative"] = normalised(rng, batch, dim)
        batch_data["hard_negative_modality"] = rng.choice(codes[:3], size=batch)
    elif negatives:
        batch_data["hard_negative"] = normalised(rng, batch, negatives, dim)
        batch_data["hard_negative_modality"] = rng.choice(codes[:3], size=(batch, negatives))
    if with_valid:
        valid = np.ones(batch, bool)
        valid[[1, batch - 1]] = False
        batch_data["valid"] = valid
    return batch_data


def embedding_names(data):
    return [k for k in ("query", "candidate", "hard_negative") if k in data]


def jax_loss_fn(data, **options):
    """loss(*embeddings) for jax.value_and_grad, the integer inputs fixed."""
    names = embedding_names(data)

    def fn(*embeddings):
        arrays = dict(zip(names, embeddings))
        loss, metrics = mamcl_loss(arrays["query"], arrays["candidate"], data["modality"],
                                   hard_negative=arrays.get("hard_negative"),
                                   hard_negative_modality=data.get("hard_negative_modality"),
                                   valid=data.get("valid"), **options)
        return loss, metrics

    return fn, names


def reference_fn(data, temperature, mask, symmetric):
    names = embedding_names(data)

    def fn(*embeddings):
        arrays = dict(zip(names, embeddings))
        return reference_loss(arrays["query"], arrays["candidate"], data["modality"], temperature=temperature,
                              mask=mask, symmetric=symmetric, hard_negative=arrays.get("hard_negative"),
                              hard_negative_modality=data.get("hard_negative_modality"), valid=data.get("valid"))

    return fn, names


# ----------------------------------------------------------------------------
# Against the reference


@pytest.mark.parametrize("mask,symmetric,negatives,with_valid",
                         list(itertools.product([True, False], [False, True], [None, 0, 2], [False, True])))
def test_matches_reference_loss_and_gradients(mask, symmetric, negatives, with_valid):
    seed = 8 * mask + 4 * symmetric + 2 * with_valid + 16 * (-1 if negatives is None else negatives)
    data = make_batch(seed=seed + 300, negatives=negatives,
                      with_valid=with_valid)
    temperature = 0.1
    fn, names = jax_loss_fn(data, temperature=temperature, modality_mask=mask, symmetric=symmetric)
    float32_inputs = [jnp.asarray(data[n], jnp.float32) for n in names]
    (value, _), grads = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(names))), has_aux=True))(
        *float32_inputs)

    ref, _ = reference_fn(data, temperature, mask, symmetric)
    # The reference sees the same float32-rounded inputs, so only the arithmetic differs.
    rounded = [np.asarray(x, np.float64) for x in float32_inputs]
    expected = ref(*rounded)
    assert abs(float(value) - expected) < 1e-5, (float(value), expected)
    assert expected > 0.05  # a degenerate case would hide errors

    expected_grads = finite_difference(ref, rounded)
    for name, got, want in zip(names, grads, expected_grads):
        scale = np.abs(want).max()
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5 * scale, err_msg=name)
        if with_valid:  # padding rows are neither queries nor columns
            assert np.all(np.asarray(got)[~data["valid"]] == 0), name


def test_float64_gradients_match_reference_tightly():
    """In float64 the code path itself (no rounding noise) matches the finite differences to ~1e-8."""
    data = make_batch(seed=7, negatives=2, with_valid=True, positive_noise=4.0)
    ref, names = reference_fn(data, 0.03, True, True)
    expected = ref(*[data[n] for n in names])
    expected_grads = finite_difference(ref, [data[n] for n in names])
    with jax.enable_x64(True):
        for chunk_size in (None, 4):
            fn, _ = jax_loss_fn(data, temperature=0.03, modality_mask=True, symmetric=True, chunk_size=chunk_size)
            (value, _), grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True))(
                *[jnp.asarray(data[n], jnp.float64) for n in names])
            assert grads[0].dtype == jnp.float64
            assert abs(float(value) - expected) < 1e-10
            for got, want in zip(grads, expected_grads):
                np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)


def test_bf16_inputs_compute_in_float32():
    data = make_batch(seed=3, batch=8, dim=16)
    query = jnp.asarray(data["query"], jnp.bfloat16)
    candidate = jnp.asarray(data["candidate"], jnp.bfloat16)
    value, _ = jax.jit(lambda q, c: mamcl_loss(q, c, data["modality"], temperature=0.03))(query, candidate)
    expected = reference_loss(np.asarray(query.astype(jnp.float32), np.float64),
                              np.asarray(candidate.astype(jnp.float32), np.float64), data["modality"],
                              temperature=0.03, mask=True, symmetric=False)
    assert value.dtype == jnp.float32
    # bf16 inputs are exact in float32, so the only error is float32 arithmetic.
    assert abs(float(value) - expected) < 1e-5
    grad = jax.jit(jax.grad(lambda q: mamcl_loss(q, candidate, data["modality"], chunk_size=3)[0]))(query)
    assert grad.dtype == jnp.bfloat16


# ----------------------------------------------------------------------------
# Dense == chunked == jit-sharded == shard_map


def _value_and_grads(fn, data, names):
    return jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(names))), has_aux=True))(
        *[jnp.asarray(data[n], jnp.float32) for n in names])


def _assert_same(result, expected, atol=2e-6):
    (value, metrics), grads = result
    (expected_value, expected_metrics), expected_grads = expected
    np.testing.assert_allclose(float(value), float(expected_value), rtol=1e-6, atol=atol)
    for key in expected_metrics:
        np.testing.assert_allclose(float(metrics[key]), float(expected_metrics[key]), rtol=1e-6, atol=atol, err_msg=key)
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=atol * 10)


# A warm temperature: every column's weight matters, so a wrongly admitted column shows.
SHARDED_OPTIONS = dict(temperature=0.25, modality_mask=True, symmetric=True)


def _sharded_data():
    return make_batch(seed=11, batch=16, dim=8, negatives=2, with_valid=True)


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 40, 1000])
def test_chunked_equals_dense(chunk_size):
    # 16 rows + 32 hard-negative columns = 48 columns: 5 and 40 do not divide it, 1000 exceeds it.
    data = _sharded_data()
    dense_fn, names = jax_loss_fn(data, **SHARDED_OPTIONS)
    chunked_fn, _ = jax_loss_fn(data, chunk_size=chunk_size, **SHARDED_OPTIONS)
    _assert_same(_value_and_grads(chunked_fn, data, names), _value_and_grads(dense_fn, data, names))


def _mesh(shape, axes):
    return jax.make_mesh(shape, axes, axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


MESHES = [((8,), ("data",)), ((2, 4), ("data", "fsdp"))]


@pytest.mark.parametrize("mesh_shape,axes", MESHES)
def test_jit_with_sharded_inputs_equals_single_device(mesh_shape, axes):
    data = _sharded_data()
    mesh = _mesh(mesh_shape, axes)
    expected = _value_and_grads(jax_loss_fn(data, **SHARDED_OPTIONS)[0], data, embedding_names(data))
    sharding = NamedSharding(mesh, PartitionSpec(axes))
    sharded = {k: jax.device_put(v if v.dtype != np.float64 else v.astype(np.float32), sharding)
               for k, v in data.items()}
    for chunk_size in (None, 6):
        fn, names = jax_loss_fn(sharded, chunk_size=chunk_size, **SHARDED_OPTIONS)
        result = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True))(*[sharded[n] for n in names])
        assert len(result[1][0].sharding.device_set) == 8  # the inputs really were spread out
        _assert_same(result, expected)


@pytest.mark.parametrize("mesh_shape,axes", MESHES)
def test_shard_map_equals_single_device(mesh_shape, axes):
    data = _sharded_data()
    mesh = _mesh(mesh_shape, axes)
    names = embedding_names(data)
    expected = _value_and_grads(jax_loss_fn(data, **SHARDED_OPTIONS)[0], data, names)
    for chunk_size in (None, 7):
        def fn(query, candidate, hard_negative, chunk_size=chunk_size):
            return mamcl_loss_sharded(query, candidate, data["modality"], mesh=mesh, axis_names=axes,
                                      hard_negative=hard_negative,
                                      hard_negative_modality=data["hard_negative_modality"], valid=data["valid"],
                                      chunk_size=chunk_size, **SHARDED_OPTIONS)

        _assert_same(_value_and_grads(fn, data, names), expected)


def test_shard_map_asymmetric_without_negatives():
    """The other branch of the sharded body: no hard negatives, no symmetric term, all rows valid."""
    data = make_batch(seed=5, batch=16, dim=8)
    mesh = _mesh((8,), ("data",))
    names = embedding_names(data)
    expected = _value_and_grads(jax_loss_fn(data, temperature=0.03)[0], data, names)

    def fn(query, candidate):
        return mamcl_loss_sharded(query, candidate, data["modality"], mesh=mesh, temperature=0.03)

    _assert_same(_value_and_grads(fn, data, names), expected)


def test_chunked_memory_stays_blockwise():
    """Compiled working set of loss + gradient: dense holds [B, B] logits, chunked only [B, N] blocks."""
    batch, dim, chunk = 2048, 32, 128
    shapes = (jax.ShapeDtypeStruct((batch, dim), jnp.float32),) * 2 + (jax.ShapeDtypeStruct((batch,), jnp.int32),)

    def temp_bytes(chunk_size):
        fn = jax.value_and_grad(lambda q, c, m: mamcl_loss(q, c, m, chunk_size=chunk_size)[0], argnums=(0, 1))
        return jax.jit(fn).lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = batch * batch * 4
    assert temp_bytes(None) >= logits_bytes
    assert temp_bytes(chunk) < logits_bytes / 4


# ----------------------------------------------------------------------------
# Edge cases


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_single_modality_batch_equals_infonce(chunk_size):
    data = make_batch(seed=2, batch=8, dim=8, codes=np.array([2, 2, 2]))
    fn_mask, names = jax_loss_fn(data, modality_mask=True, chunk_size=chunk_size)
    fn_plain, _ = jax_loss_fn(data, modality_mask=False, chunk_size=chunk_size)
    masked, plain = _value_and_grads(fn_mask, data, names), _value_and_grads(fn_plain, data, names)
    _assert_same(masked, plain, atol=0)
    assert float(masked[0][1]["masked_fraction"]) == 0.0


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_row_alone_in_its_modality_has_zero_loss_and_gradient(chunk_size):
    data = make_batch(seed=4, batch=5, dim=6, codes=np.array([1, 1, 1]))
    data["modality"] = np.array([1, 1, 1, 1, 4])  # row 4 is the only video candidate
    fn, names = jax_loss_fn(data, temperature=0.03, chunk_size=chunk_size)
    (value, metrics), (grad_q, grad_c) = _value_and_grads(fn, data, names)
    # Masked entries get exactly zero gradient: row 4 sees only itself, no other row sees column 4.
    assert np.all(np.asarray(grad_q)[4] == 0) and np.all(np.asarray(grad_c)[4] == 0)
    # Row 4 contributes exactly 0 to the mean over 5 rows.
    without = dict(data, valid=np.array([True, True, True, True, False]))
    (value_without, _), _ = _value_and_grads(jax_loss_fn(without, temperature=0.03)[0], without, names)
    np.testing.assert_allclose(float(value) * 5, float(value_without) * 4, rtol=1e-6)

    every_row_alone = dict(data, modality=np.array([1, 2, 4, 3, 5]))
    (value_alone, _), grads_alone = _value_and_grads(jax_loss_fn(every_row_alone, chunk_size=chunk_size)[0],
                                                     every_row_alone, names)
    assert float(value_alone) == 0.0
    assert all(np.all(np.asarray(g) == 0) for g in grads_alone)


@pytest.mark.parametrize("chunk_size", [None, 1])
def test_batch_of_one(chunk_size):
    data = make_batch(seed=8, batch=1, dim=4)
    fn, names = jax_loss_fn(data, chunk_size=chunk_size)
    (value, metrics), grads = _value_and_grads(fn, data, names)
    assert float(value) == 0.0 and float(metrics["accuracy"]) == 1.0
    assert all(np.all(np.asarray(g) == 0) for g in grads)
    # With one hard negative of the same modality: softplus((s_neg - s_pos) / t).
    data = make_batch(seed=8, batch=1, dim=4, negatives=0, codes=np.array([1, 1, 1]))
    value, _ = jax_loss_fn(data, temperature=1.0, chunk_size=chunk_size)[0](
        *[jnp.asarray(data[n], jnp.float32) for n in embedding_names(data)])
    positive = data["query"][0] @ data["candidate"][0]
    negative = data["query"][0] @ data["hard_negative"][0]
    expected = np.log1p(np.exp((negative - positive) / 1.0))
    assert expected > 0.1
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_all_rows_invalid_but_one(chunk_size):
    data = make_batch(seed=9, batch=8, dim=4, negatives=2, codes=np.array([1, 1, 1]))
    data["valid"] = np.zeros(8, bool)
    data["valid"][3] = True
    names = embedding_names(data)
    (value, metrics), grads = _value_and_grads(jax_loss_fn(data, temperature=0.05, chunk_size=chunk_size)[0],
                                               data, names)
    # Row 3 alone: its positive and its own two hard negatives.
    logits = np.array([data["query"][3] @ data["candidate"][3]] +
                      [data["query"][3] @ n for n in data["hard_negative"][3]]) / 0.05
    np.testing.assert_allclose(float(value), _logsumexp(logits) - logits[0], rtol=1e-5)
    assert float(metrics["valid_rows"]) == 1.0
    for grad in grads:
        assert np.all(np.asarray(grad)[np.arange(8) != 3] == 0)
        assert np.any(np.asarray(grad)[3] != 0)


def test_no_valid_row_gives_zero_loss():
    data = make_batch(seed=1, batch=4, dim=4)
    data["valid"] = np.zeros(4, bool)
    (value, _), grads = _value_and_grads(jax_loss_fn(data)[0], data, ["query", "candidate"])
    assert float(value) == 0.0 and all(np.all(np.isfinite(np.asarray(g))) for g in grads)


# ----------------------------------------------------------------------------
# Metrics on a hand-made batch


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_metrics_on_known_case(chunk_size):
    query = np.array([[1.0, 0, 0], [0.8, 0.6, 0], [0, 0, 1]])
    candidate = np.array([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]])
    modality = np.array([1, 1, 2])
    # Row 0: positive 1.0, negative c1 0.0 -> right.  Row 1: positive 0.6, negative c0 0.8 -> wrong.
    # Row 2: alone in its modality -> no negative, right, loss 0. Masked: rows 0, 1 lose column 2, row 2 loses 0 and 1.
    value, metrics = mamcl_loss(query, candidate, modality, temperature=0.1, chunk_size=chunk_size)
    np.testing.assert_allclose(float(metrics["accuracy"]), 2 / 3, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["positive_similarity"]), (1.0 + 0.6 + 1.0) / 3, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["hardest_negative_similarity"]), (0.0 + 0.8) / 2, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(metrics["masked_fraction"]), 4 / 9, rtol=1e-6)
    expected = (np.logaddexp(10.0, 0.0) - 10.0 + np.logaddexp(8.0, 6.0) - 6.0) / 3
    np.testing.assert_allclose(float(value), expected, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-6)

    # Without the mask row 2 sees columns 0 and 1 (cosine 0): all rows have a negative, nothing is masked.
    _, metrics = mamcl_loss(query, candidate, modality, temperature=0.1, modality_mask=False, chunk_size=chunk_size)
    np.testing.assert_allclose(float(metrics["hardest_negative_similarity"]), (0.0 + 0.8 + 0.0) / 3, atol=1e-7)
    assert float(metrics["masked_fraction"]) == 0.0

    # Padding row 2: 2 rows x 2 columns, none masked.
    _, metrics = mamcl_loss(query, candidate, modality, temperature=0.1, valid=np.array([True, True, False]),
                            chunk_size=chunk_size)
    assert float(metrics["masked_fraction"]) == 0.0 and float(metrics["valid_rows"]) == 2.0
    np.testing.assert_allclose(float(metrics["accuracy"]), 0.5, rtol=1e-6)


# ----------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs_raise():
    data = make_batch(seed=0, batch=4, dim=3)
    q, c, m = data["query"], data["candidate"], data["modality"]
    with pytest.raises(ValueError, match="candidate has shape"):
        mamcl_loss(q, c[:, :2], m)
    with pytest.raises(ValueError, match="candidate_modality has shape"):
        mamcl_loss(q, c, m[:3])
    with pytest.raises(ValueError, match="query has shape"):
        mamcl_loss(q[0], c, m)
    with pytest.raises(ValueError, match="hard_negative has shape"):
        mamcl_loss(q, c, m, hard_negative=np.zeros((4, 2, 5)), hard_negative_modality=np.ones((4, 2), int))
    with pytest.raises(ValueError, match="hard_negative_modality has shape"):
        mamcl_loss(q, c, m, hard_negative=np.zeros((4, 2, 3)), hard_negative_modality=np.ones((4,), int))
    with pytest.raises(ValueError, match="given together"):
        mamcl_loss(q, c, m, hard_negative=np.zeros((4, 3)))
    with pytest.raises(ValueError, match="valid has shape"):
        mamcl_loss(q, c, m, valid=np.ones(5, bool))
    for bad_chunk in (0, -3):
        with pytest.raises(ValueError, match="chunk_size must be > 0"):
            mamcl_loss(q, c, m, chunk_size=bad_chunk)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        mamcl_loss(q, c, m, chunk_size=2.5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        mamcl_loss(q, c, m, temperature=0.0)
    with pytest.raises(ValueError, match="expected an integer bitmask"):
        mamcl_loss(q, c, m.astype(np.float32))
    for bad_code in (0, 8, -1):
        with pytest.raises(ValueError, match="not a known modality code"):
            mamcl_loss(q, c, np.array([1, 2, bad_code, 4]))
    with pytest.raises(ValueError, match="hard_negative_modality.*not a known modality code"):
        mamcl_loss(q, c, m, hard_negative=np.zeros((4, 3)), hard_negative_modality=np.array([1, 16, 1, 1]))
    # A padding row may carry any code.
    mamcl_loss(q, c, np.array([1, 2, 0, 4]), valid=np.array([True, True, False, True]))
    mesh = _mesh((8,), ("data",))
    with pytest.raises(ValueError, match="not divisible"):
        mamcl_loss_sharded(q, c, m, mesh=mesh)
    with pytest.raises(ValueError, match="axis_names"):
        mamcl_loss_sharded(q, c, m, mesh=mesh, axis_names=("batch",))


def test_debug_mode_checks_traced_values():
    data = make_batch(seed=0, batch=4, dim=3)
    q, c = jnp.asarray(data["query"], jnp.float32), jnp.asarray(data["candidate"], jnp.float32)
    run = jax.jit(lambda q, c, m: mamcl_loss(q, c, m)[0])
    loss_lib.set_debug(True)
    try:
        run(q, c, jnp.array([1, 2, 3, 4])).block_until_ready()  # good input passes
        with pytest.raises(Exception, match="not L2-normalised"):
            run(q * 2.0, c, jnp.array([1, 2, 3, 4])).block_until_ready()
        with pytest.raises(Exception, match="candidate_modality row 1"):
            run(q, c, jnp.array([1, 9, 3, 4])).block_until_ready()
    finally:
        loss_lib.set_debug(None)
    # Off again: traced bad values are not checked. The switch is read at trace time, so a fresh jit.
    jax.jit(lambda q, c, m: mamcl_loss(q, c, m)[0])(q * 2.0, c, jnp.array([1, 9, 3, 4])).block_until_ready()


# ----------------------------------------------------------------------------
# GradCache


def mlp_params(seed, features=6, hidden=16, dim=8):
    rng = np.random.default_rng(seed)
    return {"w1": jnp.asarray(rng.normal(size=(features, hidden)) / np.sqrt(features), jnp.float32),
            "b1": jnp.asarray(rng.normal(size=(hidden,)) * 0.1, jnp.float32),
            "w2": jnp.asarray(rng.normal(size=(hidden, dim)) / np.sqrt(hidden), jnp.float32)}


def mlp_embed(params, batch, rng=None):
    """2-layer MLP with dropout on the hidden layer: batch["x"] [rows, features] -> [rows, dim] normalised."""
    hidden = jax.nn.gelu(batch["x"] @ params["w1"] + params["b1"])
    if rng is not None:
        keep = jax.random.bernoulli(rng, 0.8, hidden.shape)
        hidden = jnp.where(keep, hidden / 0.8, 0.0)
    out = hidden @ params["w2"]
    return out / jnp.linalg.norm(out, axis=-1, keepdims=True)


def gradcache_data(seed, batch=16, features=6):
    rng = np.random.default_rng(seed)
    return ({"x": jnp.asarray(rng.normal(size=(batch, features)), jnp.float32)},
            {"x": jnp.asarray(rng.normal(size=(batch, features)), jnp.float32)},
            jnp.asarray(rng.choice([1, 2, 4], size=batch)))


def test_gradcache_equals_full_batch_gradients():
    params = mlp_params(0)
    queries, candidates, modality = gradcache_data(1)

    def loss_fn(q, c):
        return mamcl_loss(q, c, modality, temperature=0.05, symmetric=True)

    def full_batch(p):
        return loss_fn(mlp_embed(p, queries), mlp_embed(p, candidates))

    (expected, expected_metrics), expected_grads = jax.jit(jax.value_and_grad(full_batch, has_aux=True))(params)
    run = jax.jit(lambda p: strided_gradcache_value_and_grad(mlp_embed, loss_fn, p, queries, candidates,
                                                             num_chunks=4))
    value, metrics, grads = run(params)
    np.testing.assert_allclose(float(value), float(expected), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["accuracy"]), float(expected_metrics["accuracy"]))
    for name in params:
        np.testing.assert_allclose(np.asarray(grads[name]), np.asarray(expected_grads[name]), rtol=1e-5,
                                   atol=1e-5 * float(jnp.abs(expected_grads[name]).max()), err_msg=name)
        assert grads[name].dtype == params[name].dtype
    assert max(float(jnp.abs(g).max()) for g in expected_grads.values()) > 1e-2  # not a trivial zero


@pytest.mark.parametrize("remat", [False, True])
def test_gradcache_with_dropout_equals_full_batch(remat):
    """Dropout with the documented per-sub-batch keys: the full-batch reference uses the same masks."""
    params = mlp_params(2)
    queries, candidates, modality = gradcache_data(3)
    num_chunks, key = 4, jax.random.key(5)

    def loss_fn(q, c):
        return mamcl_loss(q, c, modality, temperature=0.05, chunk_size=5)

    def embed_like_gradcache(p, batch, stream):
        # Written out from the documented layout: sub-batch k = rows k::num_chunks with key
        # fold_in(fold_in(key, stream), k); the rows are put back in batch order.
        pieces = [mlp_embed(p, {"x": batch["x"][k::num_chunks]},
                            jax.random.fold_in(jax.random.fold_in(key, stream), k)) for k in range(num_chunks)]
        return jnp.stack(pieces, axis=1).reshape(batch["x"].shape[0], -1)

    def full_batch(p):
        return loss_fn(embed_like_gradcache(p, queries, 0), embed_like_gradcache(p, candidates, 1))[0]

    expected, expected_grads = jax.jit(jax.value_and_grad(full_batch))(params)
    # The no-gradient chunked embedding of pass (a) uses the same keys.
    np.testing.assert_allclose(
        np.asarray(strided_embed_in_chunks(mlp_embed, params, candidates, num_chunks=num_chunks, rng=key,
                                           stream=gradcache.CANDIDATE_STREAM)),
        np.asarray(embed_like_gradcache(params, candidates, 1)), rtol=1e-6, atol=1e-6)
    value, aux, grads = jax.jit(lambda p: strided_gradcache_value_and_grad(
        mlp_embed, lambda q, c: loss_fn(q, c)[0], p, queries, candidates, num_chunks=num_chunks, rng=key,
        has_aux=False, remat=remat))(params)
    assert aux is None
    np.testing.assert_allclose(float(value), float(expected), rtol=1e-6)
    for name in params:
        np.testing.assert_allclose(np.asarray(grads[name]), np.asarray(expected_grads[name]), rtol=1e-5,
                                   atol=1e-5 * float(jnp.abs(expected_grads[name]).max()), err_msg=name)
    # The dropout is real: without the rng the gradient is different.
    _, _, no_dropout = jax.jit(lambda p: strided_gradcache_value_and_grad(
        mlp_embed, lambda q, c: loss_fn(q, c)[0], p, queries, candidates, num_chunks=num_chunks, has_aux=False))(params)
    assert float(jnp.abs(no_dropout["w1"] - grads["w1"]).max()) > 1e-3


def test_gradcache_sharded_batch_and_stacked_layout():
    params = mlp_params(4)
    queries, candidates, modality = gradcache_data(6, batch=32)
    mesh = _mesh((8,), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))

    def loss_fn(q, c):
        return mamcl_loss(q, c, modality, temperature=0.05)

    (expected, _), expected_grads = jax.jit(jax.value_and_grad(
        lambda p: loss_fn(mlp_embed(p, queries), mlp_embed(p, candidates)), has_aux=True))(params)
    sharded_q, sharded_c = jax.device_put((queries, candidates), sharding)
    value, _, grads = jax.jit(lambda p, q, c: strided_gradcache_value_and_grad(
        mlp_embed, loss_fn, p, q, c, num_chunks=2))(params, sharded_q, sharded_c)
    np.testing.assert_allclose(float(value), float(expected), rtol=1e-6)
    for name in params:
        np.testing.assert_allclose(np.asarray(grads[name]), np.asarray(expected_grads[name]), rtol=1e-5,
                                   atol=1e-5 * float(jnp.abs(expected_grads[name]).max()), err_msg=name)

    # Stacked: the caller chunks contiguously ([4, 8, ...]); embeddings come back in that (= batch) order.
    stacked = jax.tree.map(lambda x: x.reshape(4, 8, -1), (queries, candidates))
    value, _, grads = jax.jit(lambda p, q, c: gradcache.gradcache_value_and_grad(
        mlp_embed, loss_fn, p, q, c, num_chunks=4))(params, *stacked)
    np.testing.assert_allclose(float(value), float(expected), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grads["w2"]), np.asarray(expected_grads["w2"]), rtol=1e-5,
                               atol=1e-5 * float(jnp.abs(expected_grads["w2"]).max()))


def test_gradcache_memory_is_one_sub_batch():
    """Compiled working set: the plain step holds every row's activations, GradCache one sub-batch's."""
    params = mlp_params(0, features=6, hidden=2048, dim=8)
    batch, num_chunks = 1024, 16
    shapes = {"x": jax.ShapeDtypeStruct((batch, 6), jnp.float32)}
    modality = jnp.ones((batch,), jnp.int32)

    def loss_fn(q, c):  # chunked, so that the [batch, batch] logits do not dominate either step
        return mamcl_loss(q, c, modality, chunk_size=64)

    def plain(p, q, c):
        return jax.value_and_grad(lambda p: loss_fn(mlp_embed(p, q), mlp_embed(p, c)), has_aux=True)(p)

    def cached(p, q, c):
        return strided_gradcache_value_and_grad(mlp_embed, loss_fn, p, q, c, num_chunks=num_chunks)

    def temp_bytes(fn):
        return jax.jit(fn).lower(params, shapes, shapes).compile().memory_analysis().temp_size_in_bytes

    activation_bytes = 2 * batch * 2048 * 4  # queries and candidates, one hidden layer
    plain_bytes, cached_bytes = temp_bytes(plain), temp_bytes(cached)
    assert plain_bytes >= activation_bytes
    assert cached_bytes < activation_bytes / 4


def test_gradcache_bad_inputs_raise():
    params = mlp_params(0)
    queries, candidates, modality = gradcache_data(1)
    loss_fn = lambda q, c: mamcl_loss(q, c, modality)  # noqa: E731
    with pytest.raises(ValueError, match="not divisible by num_chunks=3"):
        strided_gradcache_value_and_grad(mlp_embed, loss_fn, params, queries, candidates, num_chunks=3)
    with pytest.raises(ValueError, match="num_chunks must be a positive int"):
        gradcache.gradcache_value_and_grad(mlp_embed, loss_fn, params, queries, candidates, num_chunks=0)
    # the library takes sub-batches stacked on a leading axis: a flat batch of 16 rows is not 2 sub-batches
    with pytest.raises(ValueError, match="query_batch: the leaves need a leading axis of num_chunks=2"):
        gradcache.gradcache_value_and_grad(mlp_embed, loss_fn, params, queries, candidates, num_chunks=2)


@pytest.mark.parametrize("mask", [True, False])
def test_absent_hard_negatives_are_not_columns(mask):
    """Code 0 marks an example without a hard negative: no row may see that column, masked or not."""
    rng = np.random.default_rng(7)
    query, candidate, negative = normalised(rng, 6, 4), normalised(rng, 6, 4), normalised(rng, 6, 4)
    modality = np.array([1, 2, 1, 3, 2, 1], np.int32)
    negative_modality = np.array([1, 0, 2, 0, 2, 1], np.int32)
    loss, _ = mamcl_loss(jnp.asarray(query), jnp.asarray(candidate), jnp.asarray(modality), temperature=0.05,
                         modality_mask=mask, hard_negative=jnp.asarray(negative),
                         hard_negative_modality=jnp.asarray(negative_modality))
    expected = reference_loss(query, candidate, modality, temperature=0.05, mask=mask, symmetric=False,
                              hard_negative=negative, hard_negative_modality=negative_modality)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    # the present negatives do count (the absent ones are what the reference leaves out)
    without_negatives = reference_loss(query, candidate, modality, temperature=0.05, mask=mask, symmetric=False)
    assert abs(expected - without_negatives) > 1e-3
