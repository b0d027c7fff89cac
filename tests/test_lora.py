"""LoRA on the LLM's linear layers (unite_jax/model/lora.py) and LoRA dropout driven by an explicit rng.

References are independent of the code under test: numpy formulas for one linear and for the
merged kernels, hand-written shapes of the tiny preset, finite differences for gradients.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_lora

from unite_jax.data import media
from unite_jax.data.items import prepare_item
from unite_jax.data.packing import choose_shapes, pack_batch
from unite_jax.data.tokenize import PromptTokenizer
from unite_jax.model.config import preset
from unite_jax.model.embedder import embed
from unite_jax.model.layers import linear
from unite_jax.model.lora import LORA_TARGETS, abstract_lora, init_lora, lora_scale, lora_shapes, merge_lora, with_lora
from unite_jax.model.options import LoraOptions, RunOptions
from unite_jax.model.params import init_params, is_shape, param_shapes
from unite_jax.model.text import text_model

CFG = preset("tiny")  # hidden 64, 4 heads of 16, 2 KV heads, intermediate 128, 2 layers
RANK = 4
SCALE = lora_scale(16, 8)  # stage 1
# One jitted forward shared by the tests, so equal (tree structure, config) pairs compile once.
# GradCache calls embed_fn(params, sub_batch) without rng and embed_fn(params, sub_batch, key) with one.
_embed = jax.jit(lambda p, b, run, k=None: embed(p, b, CFG, run, k), static_argnums=2)


@pytest.fixture(scope="module")
def params():
    return jax.tree.map(jnp.asarray, init_params(CFG, seed=3, std=0.2))


@pytest.fixture(scope="module")
def batch_and_run(tiny_tokenizer_dir):
    """A real packed batch (text, image, fused text+image), its run options, and those with LoRA on."""
    rng = np.random.default_rng(0)
    tokenizer = PromptTokenizer.from_pretrained(tiny_tokenizer_dir)
    processor = media.ProcessorConfig(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)
    items = [{"text": "a red circle"}, {"image": rng.integers(0, 256, (70, 90, 3), np.uint8)},
             {"text": "<|IMAGE|> same object", "image": rng.integers(0, 256, (60, 60, 3), np.uint8)}]
    prepared = [prepare_item(item, i, tokenizer, processor) for i, item in enumerate(items)]
    seq, budget, block = choose_shapes(prepared, 1, len(items))
    batch = pack_batch(prepared, num_shards=1, rows_per_shard=len(items), seq_len=seq, patch_budget=budget,
                       pad_id=tokenizer.pad_id, patch_dim=CFG.vision.patch_dim, vision_block=block)
    run = RunOptions(vision_block=block)
    return batch, run, run.replace(lora=LoraOptions(SCALE, dropout=0.1))


def _random_lora(seed):
    """A LoRA tree on every target with A and B ~ normal(0, 0.3) (B is zero after init_lora)."""
    stand_ins = jax.tree.map(lambda shape: np.empty(shape, np.float32), param_shapes(CFG), is_leaf=is_shape)
    layers = stand_ins["model"]["layers"]
    pairs = [(module, name) for module in ("self_attn", "mlp") for name in LORA_TARGETS if name in layers[module]]
    return random_lora(stand_ins, pairs, RANK, seed)


def _text_inputs(seed=5, batch=2, seq=9):
    rng = np.random.default_rng(seed)
    embeds = rng.standard_normal((batch, seq, CFG.hidden_size)).astype(np.float32)
    mask = np.ones((batch, seq), np.int32)
    mask[0, :3] = 0
    positions = np.broadcast_to(np.arange(seq, dtype=np.int32)[None, None], (batch, 3, seq)).copy()
    return embeds, mask, positions


# --------------------------------------------------------------------------------------------- init
def test_shapes_mirror_the_targets_of_the_tiny_model():
    # tiny: hidden 64, q heads 4 x 16 = 64, kv heads 2 x 16 = 32, intermediate 128, 2 layers
    expected = {"model": {"layers": {
        "self_attn": {"q_proj": {"lora_a": (2, 64, RANK), "lora_b": (2, RANK, 64)},
                      "k_proj": {"lora_a": (2, 64, RANK), "lora_b": (2, RANK, 32)},
                      "v_proj": {"lora_a": (2, 64, RANK), "lora_b": (2, RANK, 32)},
                      "o_proj": {"lora_a": (2, 64, RANK), "lora_b": (2, RANK, 64)}},
        "mlp": {"gate_proj": {"lora_a": (2, 64, RANK), "lora_b": (2, RANK, 128)},
                "up_proj": {"lora_a": (2, 64, RANK), "lora_b": (2, RANK, 128)},
                "down_proj": {"lora_a": (2, 128, RANK), "lora_b": (2, RANK, 64)}}}}}
    assert lora_shapes(CFG, RANK) == expected
    lora = init_lora(CFG, RANK, seed_or_key=0)
    assert jax.tree.map(lambda a: a.shape, lora) == expected
    abstract = abstract_lora(CFG, RANK, dtype="bfloat16")
    assert jax.tree.map(lambda s: (s.shape, s.dtype), abstract) == jax.tree.map(
        lambda s: (s, jnp.dtype(jnp.bfloat16)), expected, is_leaf=lambda x: isinstance(x, tuple))
    subset = lora_shapes(CFG, 2, ("v_proj", "down_proj"))
    assert subset == {"model": {"layers": {"self_attn": {"v_proj": {"lora_a": (2, 64, 2), "lora_b": (2, 2, 32)}},
                                           "mlp": {"down_proj": {"lora_a": (2, 128, 2), "lora_b": (2, 2, 64)}}}}}
    assert LORA_TARGETS == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    with pytest.raises(ValueError, match="LoRA targets"):
        lora_shapes(CFG, RANK, ("q_proj", "qkv"))
    with pytest.raises(ValueError, match="rank must be positive"):
        init_lora(CFG, 0, seed_or_key=0)
    assert lora_scale(16, 8) == 2.0 and lora_scale(64, 8) == 8.0


def test_init_is_kaiming_uniform_a_and_zero_b():
    lora = init_lora(CFG, RANK, seed_or_key=jax.random.key(7))
    for module in lora["model"]["layers"].values():
        for name, pair in module.items():
            a, b = np.asarray(pair["lora_a"]), np.asarray(pair["lora_b"])
            assert a.dtype == np.float32 and (b == 0).all(), name
            bound = 1 / np.sqrt(a.shape[1])  # Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))
            assert bound * 0.95 < np.abs(a).max() <= bound * (1 + 1e-6), name  # 1e-6: float32 rounding of the bound
            np.testing.assert_allclose(a.std(), bound / np.sqrt(3), rtol=0.1, err_msg=name)
            assert abs(a.mean()) < 0.05 * bound, name
            assert not np.array_equal(a[0], a[1]), name  # layers draw independently
    # an int seed and a subset of targets: a target's A does not depend on the other targets
    full, part = init_lora(CFG, RANK, seed_or_key=1), init_lora(CFG, RANK, seed_or_key=1, targets=("up_proj",))
    np.testing.assert_array_equal(full["model"]["layers"]["mlp"]["up_proj"]["lora_a"],
                                  part["model"]["layers"]["mlp"]["up_proj"]["lora_a"])
    assert init_lora(CFG, RANK, seed_or_key=0, dtype="bfloat16")["model"]["layers"]["mlp"]["up_proj"][
        "lora_a"].dtype == jnp.bfloat16


def test_initial_lora_forward_equals_the_base_forward(params, batch_and_run):
    batch, run, lora_run = batch_and_run
    base = np.asarray(_embed(params, batch, run))
    adapted = with_lora(params, init_lora(CFG, RANK, seed_or_key=0))
    np.testing.assert_array_equal(np.asarray(_embed(adapted, batch, lora_run)), base)
    # B = 0: dropout on the LoRA input changes nothing either
    np.testing.assert_array_equal(np.asarray(_embed(adapted, batch, lora_run, jax.random.key(0))), base)


# -------------------------------------------------------------------------------------- with / merge
def test_with_lora_shares_base_arrays_and_checks_shapes(params):
    lora = init_lora(CFG, RANK, seed_or_key=0)
    adapted = with_lora(params, lora)
    q = adapted["model"]["layers"]["self_attn"]["q_proj"]
    assert sorted(q) == ["bias", "kernel", "lora_a", "lora_b"]
    assert q["kernel"] is params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q["lora_a"] is lora["model"]["layers"]["self_attn"]["q_proj"]["lora_a"]
    flat_base = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
    for path, leaf in jax.tree_util.tree_leaves_with_path(adapted):
        name = jax.tree_util.keystr(path)
        if "lora_" not in name:
            assert leaf is flat_base[name], name  # no array copied
    assert "lora_a" not in params["model"]["layers"]["self_attn"]["q_proj"]  # the input is left untouched
    with pytest.raises(ValueError, match="already carry LoRA"):
        with_lora(adapted, lora)
    wrong = jax.tree.map(lambda a: a, lora)
    wrong["model"]["layers"]["mlp"]["down_proj"]["lora_a"] = jnp.zeros((2, 64, RANK))
    with pytest.raises(ValueError, match=r"model/layers/mlp/down_proj: expected lora_a \(2, 128, 4\)"):
        with_lora(params, wrong)
    with pytest.raises(ValueError, match="no model/layers/mlp/fc9"):
        with_lora(params, {"model": {"layers": {"mlp": {"fc9": {"lora_a": 0, "lora_b": 0}}}}})


def test_lora_leaves_without_lora_options_are_an_error(params):
    embeds, mask, positions = _text_inputs()
    adapted = with_lora(params, init_lora(CFG, RANK, seed_or_key=0))
    with pytest.raises(ValueError, match="carries lora_a/lora_b but the run has no LoRA"):
        text_model(adapted["model"], embeds, mask, positions, CFG, RunOptions())


def test_merge_lora_matches_numpy_formula_on_host_and_under_jit(params):
    lora = _random_lora(1)
    host_params = jax.tree.map(np.asarray, params)
    host_lora = jax.tree.map(np.asarray, lora)
    merged_host = merge_lora(host_params, host_lora, 2.0)
    merged_jit = jax.jit(merge_lora)(params, lora, 2.0)
    for module in ("self_attn", "mlp"):
        for name, pair in host_lora["model"]["layers"][module].items():
            w = host_params["model"]["layers"][module][name]["kernel"].astype(np.float64)
            expected = w + 2.0 * np.einsum("lir,lro->lio", pair["lora_a"].astype(np.float64),
                                           pair["lora_b"].astype(np.float64))
            got_host = merged_host["model"]["layers"][module][name]["kernel"]
            assert isinstance(got_host, np.ndarray) and got_host.dtype == np.float32
            np.testing.assert_allclose(got_host, expected, atol=1e-6, rtol=1e-6, err_msg=name)
            np.testing.assert_allclose(merged_jit["model"]["layers"][module][name]["kernel"], expected,
                                       atol=1e-6, rtol=1e-6, err_msg=name)
    # untouched leaves are shared, biases of targeted linears too
    assert merged_host["visual"]["blocks"]["attn"]["qkv"]["kernel"] is host_params["visual"]["blocks"]["attn"]["qkv"][
        "kernel"]
    assert merged_host["model"]["layers"]["self_attn"]["q_proj"]["bias"] is host_params["model"]["layers"][
        "self_attn"]["q_proj"]["bias"]
    # a bf16 kernel stays bf16, on the host and under jit
    bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), host_params)
    merged_bf16 = merge_lora(bf16, host_lora, 2.0)["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(merged_bf16, np.ndarray) and merged_bf16.dtype == jnp.bfloat16
    merged_bf16 = jax.jit(merge_lora)(bf16, lora, 2.0)["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert merged_bf16.dtype == jnp.bfloat16


def test_merged_forward_equals_unmerged_forward(params, batch_and_run):
    batch, run, lora_run = batch_and_run
    lora = _random_lora(2)
    unmerged = np.asarray(_embed(with_lora(params, lora), batch, lora_run))
    merged = np.asarray(_embed(merge_lora(params, lora, SCALE), batch, run))
    base = np.asarray(_embed(params, batch, run))
    assert np.abs(unmerged - base).max() > 0.05  # the adapter really changes the embedding
    np.testing.assert_allclose(unmerged, merged, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------- one linear
def _one_linear(seed=0, shape=(2, 3, 5), out=4, rank=2):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    p = {"kernel": rng.standard_normal((shape[-1], out)).astype(np.float32),
         "bias": rng.standard_normal(out).astype(np.float32),
         "lora_a": rng.standard_normal((shape[-1], rank)).astype(np.float32),
         "lora_b": rng.standard_normal((rank, out)).astype(np.float32)}
    return x, p


def test_linear_with_lora_and_dropout_matches_numpy_reference():
    x, p = _one_linear()
    rate, scale, key = 0.3, 1.7, jax.random.key(11)
    keep = np.asarray(jax.random.bernoulli(key, 1 - rate, x.shape))
    assert keep.any() and not keep.all()
    x64 = x.astype(np.float64)
    base = x64 @ p["kernel"] + p["bias"]
    expected = base + scale * (((x64 * keep / (1 - rate)) @ p["lora_a"]) @ p["lora_b"])
    got = np.asarray(linear(x, p, jnp.float32, lora=LoraOptions(scale, rate), rng=key))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    # bf16 compute (LoRA leaves stay float32): same masks, bf16 rounding only
    got_bf16 = linear(x, p, jnp.bfloat16, lora=LoraOptions(scale, rate), rng=key)
    assert got_bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got_bf16, np.float32), expected, atol=0.1, rtol=0.02)
    # without rng (or with rate 0) the LoRA branch sees all of x
    no_dropout = base + scale * ((x64 @ p["lora_a"]) @ p["lora_b"])
    np.testing.assert_allclose(np.asarray(linear(x, p, jnp.float32, lora=LoraOptions(scale, rate))),
                               no_dropout, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(linear(x, p, jnp.float32, lora=LoraOptions(scale), rng=key)), no_dropout,
                               atol=1e-5, rtol=1e-5)
    # no LoRA leaves: rng and dropout are irrelevant
    plain = {"kernel": p["kernel"], "bias": p["bias"]}
    np.testing.assert_allclose(np.asarray(linear(x, plain, jnp.float32, lora=LoraOptions(scale, rate), rng=key)),
                               base, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs both 'lora_a' and 'lora_b'"):
        linear(x, {"kernel": p["kernel"], "lora_a": p["lora_a"]}, jnp.float32, lora=LoraOptions(1.0))


def test_dropout_expectation_over_keys_is_the_no_dropout_output():
    x, p = _one_linear(seed=1, shape=(3, 6), out=5, rank=3)
    rate, scale, n = 0.4, 2.0, 4000
    keys = jax.random.split(jax.random.key(0), n)
    outs = np.asarray(jax.vmap(lambda k: linear(x, p, jnp.float32, lora=LoraOptions(scale, rate), rng=k))(keys))
    reference = np.asarray(linear(x, p, jnp.float32, lora=LoraOptions(scale)))
    assert np.abs(outs - reference).max() > 0.1  # each draw really drops
    stderr = outs.std(axis=0) / np.sqrt(n)
    assert (np.abs(outs.mean(axis=0) - reference) < 5 * stderr + 1e-6).all()
    # the kept fraction is 1 - rate
    kept = float(jnp.mean(jax.vmap(lambda k: jax.random.bernoulli(k, 1 - rate, x.shape))(keys[:200])))
    assert abs(kept - (1 - rate)) < 0.03


# -------------------------------------------------------------------------------------- full forward
def test_dropout_rng_in_the_embedder(params, batch_and_run):
    batch, _, lora_run = batch_and_run
    adapted = with_lora(params, _random_lora(3))
    first = np.asarray(_embed(adapted, batch, lora_run))
    np.testing.assert_array_equal(np.asarray(_embed(adapted, batch, lora_run)), first)  # rng=None: deterministic
    a, a_again, b = (np.asarray(_embed(adapted, batch, lora_run, k)) for k in (jax.random.key(1), jax.random.key(1),
                                                                             jax.random.key(2)))
    np.testing.assert_array_equal(a, a_again)  # same key, same masks
    assert np.abs(a - b).max() > 1e-3 and np.abs(a - first).max() > 1e-3


def test_gradients_reach_only_the_lora_tree(params, batch_and_run):
    batch, _, lora_run = batch_and_run
    weights = jnp.asarray(np.random.default_rng(0).standard_normal((3, CFG.hidden_size)), jnp.float32)

    def loss(lora):  # base params are closed over: not an argument, so they get no gradient at all
        return jnp.sum(embed(with_lora(params, lora), batch, CFG, lora_run) * weights)

    value_and_grad = jax.jit(jax.value_and_grad(loss))  # one compile serves the gradient and the loss values
    for name, lora, b_is_zero in (("init", init_lora(CFG, RANK, seed_or_key=0), True),
                                  ("random", _random_lora(4), False)):
        grads = value_and_grad(lora)[1]
        assert jax.tree.structure(grads) == jax.tree.structure(lora), name
        for module in ("self_attn", "mlp"):
            for target, pair in grads["model"]["layers"][module].items():
                ga, gb = np.asarray(pair["lora_a"]), np.asarray(pair["lora_b"])
                if b_is_zero:  # dL/dA = x^T (dL/dy) B^T = 0 when B = 0; dL/dB = (x A)^T dL/dy != 0
                    assert (ga == 0).all(), (name, target)
                else:
                    assert (np.abs(ga).max(axis=(1, 2)) > 0).all(), (name, target)  # every layer
                assert (np.abs(gb).max(axis=(1, 2)) > 0).all(), (name, target)  # every layer
        # directional finite difference: the gradient is the derivative of the loss
        direction = _random_direction(lora, seed=9)
        numeric = _directional_derivative(lambda tree: value_and_grad(tree)[0], lora, direction)
        analytic = sum(float(jnp.sum(g * d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
        # atol: float32 rounding of the loss (~1e-6) divided by the steps leaves ~6e-4 of noise
        np.testing.assert_allclose(analytic, numeric, rtol=3e-3, atol=1e-3, err_msg=name)


def _random_direction(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda leaf: 0.1 * rng.standard_normal(leaf.shape, np.float32), tree)


def _directional_derivative(f, tree, direction):
    """d/dt f(tree + t * direction) at t = 0 by Richardson-extrapolated central differences (error O(h^4)).

    The adapted model is strongly non-linear at this scale, and a plain central difference with a
    step small enough for that drowns in float32 rounding.
    """
    def at(t):
        return float(f(jax.tree.map(lambda leaf, d: leaf + t * d, tree, direction)))

    def central(h):
        return (at(h) - at(-h)) / (2 * h)

    return (4 * central(2.5e-3) - central(5e-3)) / 3


def test_scan_unrolled_and_remat_agree_with_dropout_on(params):
    embeds, mask, positions = _text_inputs()
    lora, key = _random_lora(5), jax.random.key(21)
    lora_run = RunOptions(lora=LoraOptions(2.0, dropout=0.2))

    def compiled(c):
        """A jitted key -> (hidden states [batch, seq, hidden], LoRA gradients) for run options c."""
        def loss(adapters, k):
            out = text_model(with_lora(params, adapters)["model"], embeds, mask, positions, CFG, c, rng=k)
            return jnp.sum(out[:, -1] * out[:, -2]), out

        step = jax.jit(jax.value_and_grad(loss, has_aux=True))

        def run(k):
            (_, out), grads = step(lora, k)
            return np.asarray(out), grads

        return run

    base = compiled(lora_run)
    base_out, base_grads = base(key)
    assert np.abs(base_out - base(jax.random.key(22))[0]).max() > 1e-3  # dropout is on: the key matters
    for variant in (lora_run.replace(scan_layers=False), lora_run.replace(remat="full")):
        out, grads = compiled(variant)(key)
        # Same math and same masks; XLA fuses the unrolled/rematerialised forms differently, and this
        # random-weight model amplifies float32 rounding to ~1e-5 of each array's scale. A wrong mask
        # changes the outputs by > 1e-3 (checked above) and the gradients by far more.
        where = f"scan_layers={variant.scan_layers} remat={variant.remat}"
        np.testing.assert_allclose(out, base_out, atol=1e-4, rtol=1e-4, err_msg=where)
        for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(base_grads)):
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=2e-5 * np.abs(expected).max(), err_msg=where)


def test_run_options_are_hashable_and_checked():
    run = RunOptions(lora=LoraOptions(2.0, dropout=0.05))
    assert hash(run) == hash(RunOptions(lora=LoraOptions(2.0, dropout=0.05))) and run != RunOptions()
    assert RunOptions().lora is None and LoraOptions(2.0).dropout == 0.0
    with pytest.raises(ValueError, match="lora_dropout"):
        LoraOptions(2.0, dropout=1.0)
    with pytest.raises(ValueError, match="lora_scale"):
        LoraOptions(float("nan"))
    with pytest.raises(ValueError, match="lora_scale"):
        LoraOptions(0.0)  # a zero scale would silently train nothing
    assert not any(f.name in ("positions", "compute_dtype", "lora_scale", "vision_block")
                   for f in dataclasses.fields(CFG))  # ModelConfig is the architecture only
