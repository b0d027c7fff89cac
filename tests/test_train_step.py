"""The train step's chunk modes against independent computations on the tiny embedder."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unite_jax import parallel
from unite_jax.data.items import prepare_item
from unite_jax.data.media import ProcessorConfig, normalize_table
from unite_jax.data.packing import BATCH_KEYS, pack_batch
from unite_jax.data.tokenize import PromptTokenizer
from unite_jax.loss import mamcl_loss
from unite_jax.model.config import preset
from unite_jax.model.embedder import embed
from unite_jax.model.options import RunOptions
from unite_jax.model.params import init_params
from unite_jax.train.state import create_state
from unite_jax.train.step import LossSettings, loss_and_grads, train_step

CFG = preset("tiny")
RUN = RunOptions(vision_block=64)
PROCESSOR = ProcessorConfig(min_pixels=16 * 28 * 28, max_pixels=64 * 28 * 28)


def _stream(items, tokenizer, rows, patch_dtype=np.float32, patches_per_row=64):
    prepared = [prepare_item(item, i, tokenizer, PROCESSOR, 64) for i, item in enumerate(items)]
    patches = np.zeros((1, rows * patches_per_row, CFG.vision.patch_dim), patch_dtype)
    packed = pack_batch(prepared, num_shards=1, rows_per_shard=rows, seq_len=96, patch_budget=rows * patches_per_row,
                        pad_id=tokenizer.pad_id, patch_dim=CFG.vision.patch_dim, vision_block=64, share_tiles=False,
                        patches_out=patches)
    return {key: jnp.asarray(packed[key]) for key in BATCH_KEYS}


def _batch(tokenizer, chunks=2, rows=3, patch_dtype=np.float32, query_patches_per_row=64):
    """[chunks] packed sub-batches of `rows` examples: text queries, image or text candidates."""
    rng = np.random.default_rng(0)
    words = ["cat", "dog", "red", "park", "moon", "clock", "horse", "coffee", "rocket", "brick", "grass", "coins"]
    queries, candidates, codes = [], [], []
    for c in range(chunks):
        q_items, c_items, chunk_codes = [], [], []
        for r in range(rows):
            q_items.append({"text": f"a {words[(c * rows + r) % 12]} near the {words[(c + r * 5) % 12]}"})
            if r % 2:
                c_items.append({"image": rng.integers(0, 256, (56, 56, 3), np.uint8)})
                chunk_codes.append(2)
            else:
                c_items.append({"text": f"the {words[(c * rows + r + 3) % 12]}"})
                chunk_codes.append(1)
        queries.append(_stream(q_items, tokenizer, rows, patch_dtype, query_patches_per_row))
        candidates.append(_stream(c_items, tokenizer, rows, patch_dtype))
        codes.append(chunk_codes)
    stack = lambda streams: {k: jnp.stack([s[k] for s in streams]) for k in BATCH_KEYS}  # noqa: E731
    return {"query": stack(queries), "candidate": stack(candidates),
            "candidate_modality": jnp.asarray(codes, jnp.int32), "valid": jnp.ones((chunks, rows), bool)}


def test_chunk_modes_match_independent_computations(tiny_tokenizer_dir):
    tokenizer = PromptTokenizer.from_pretrained(tiny_tokenizer_dir)
    params = jax.tree.map(jnp.asarray, init_params(CFG, seed=3, std=0.05))
    batch = _batch(tokenizer)
    settings = LossSettings(temperature=0.05, modality_mask=True)
    kwargs = dict(cfg=CFG, run=RUN, settings=settings, has_negatives=False)

    def chunk_loss(p, c):
        q = embed(p, {k: batch["query"][k][c] for k in BATCH_KEYS}, CFG, RUN)
        e = embed(p, {k: batch["candidate"][k][c] for k in BATCH_KEYS}, CFG, RUN)
        return q, e

    # accumulate: the mean over chunks of each chunk's own loss
    def accumulated_reference(p):
        losses = []
        for c in range(2):
            q, e = chunk_loss(p, c)
            losses.append(mamcl_loss(q, e, batch["candidate_modality"][c], temperature=0.05)[0])
        return sum(losses) / 2

    loss, _, grads = loss_and_grads(params, {}, batch, None, accumulate=True, **kwargs)
    ref_loss, ref_grads = jax.value_and_grad(accumulated_reference)(params)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-6, rtol=1e-4)

    # gradcache: one loss over the union of the chunks (every chunk's candidates are negatives)
    def whole_batch_reference(p):
        pairs = [chunk_loss(p, c) for c in range(2)]
        q = jnp.concatenate([a for a, _ in pairs])
        e = jnp.concatenate([b for _, b in pairs])
        return mamcl_loss(q, e, batch["candidate_modality"].reshape(-1), temperature=0.05)[0]

    loss, _, grads = loss_and_grads(params, {}, batch, None, accumulate=False, **kwargs)
    ref_loss, ref_grads = jax.value_and_grad(whole_batch_reference)(params)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-6, rtol=1e-4)
    assert abs(float(loss) - float(accumulated_reference(params))) > 1e-4  # the two objectives differ


def test_nonfinite_update_is_not_applied(tiny_tokenizer_dir):
    tokenizer = PromptTokenizer.from_pretrained(tiny_tokenizer_dir)
    params = jax.tree.map(jnp.asarray, init_params(CFG, seed=3, std=0.05))
    batch = _batch(tokenizer, chunks=1)
    tx = optax.sgd(1.0)
    state = create_state(params, tx, seed=0)
    poisoned = jax.tree.map(lambda x: x, params)
    poisoned["model"]["norm"]["weight"] = poisoned["model"]["norm"]["weight"].at[0].set(jnp.nan)
    state = state.replace(trainable=poisoned)
    new_state, metrics = train_step(state, {}, batch, cfg=CFG, run=RUN, settings=LossSettings(), tx=tx,
                                    schedule=lambda step: 1.0, has_negatives=False)
    assert float(metrics["finite"]) == 0.0
    assert int(new_state.step) == 1
    for new, old in zip(jax.tree.leaves(new_state.trainable), jax.tree.leaves(poisoned)):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))


def test_uint8_pixel_levels_train_exactly_like_float32_patches(tiny_tokenizer_dir):
    """The step normalises uint8 levels on the device: the same update as host-normalised patches."""
    tokenizer = PromptTokenizer.from_pretrained(tiny_tokenizer_dir)
    params = jax.tree.map(jnp.asarray, init_params(CFG, seed=3, std=0.05))
    floats, levels = _batch(tokenizer), _batch(tokenizer, patch_dtype=np.uint8)
    assert levels["candidate"]["patches"].dtype == jnp.uint8 and levels["candidate"]["patches"].any()
    tx = optax.adamw(1e-3)
    step = functools.partial(train_step, cfg=CFG, run=RUN, settings=LossSettings(temperature=0.05), tx=tx,
                             schedule=lambda step: 1e-3, has_negatives=False)
    table = normalize_table(PROCESSOR)
    want_state, want = step(create_state(params, tx, seed=0), {}, floats)
    got_state, got = step(create_state(params, tx, seed=0), {}, levels, pixel_table=table)
    assert float(got["loss"]) == float(want["loss"])
    for new, old in zip(jax.tree.leaves(got_state.trainable), jax.tree.leaves(want_state.trainable)):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
    with pytest.raises(ValueError, match="no pixel table"):
        step(create_state(params, tx, seed=0), {}, levels)


def test_text_only_stream_without_patches_trains_exactly_like_padded_patches(tiny_tokenizer_dir):
    """data.query_patches_per_row=0: the text queries' stream has no patch slots and skips the vision
    tower; embeddings, loss and update are those of the same queries with a padding-only patch row."""
    tokenizer = PromptTokenizer.from_pretrained(tiny_tokenizer_dir)
    params = jax.tree.map(jnp.asarray, init_params(CFG, seed=3, std=0.05))
    padded, text_only = _batch(tokenizer), _batch(tokenizer, query_patches_per_row=0)
    assert text_only["query"]["patches"].shape[2] == 0 and padded["query"]["patches"].shape[2] == 3 * 64
    chunk = lambda b: {k: v[0] for k, v in b["query"].items()}  # noqa: E731
    np.testing.assert_array_equal(np.asarray(embed(params, chunk(text_only), CFG, RUN)),
                                  np.asarray(embed(params, chunk(padded), CFG, RUN)))
    tx = optax.adamw(1e-3)
    step = jax.jit(functools.partial(train_step, cfg=CFG, run=RUN, settings=LossSettings(temperature=0.05), tx=tx,
                                     schedule=lambda step: 1e-3, has_negatives=False))
    want_state, want = step(create_state(params, tx, seed=0), {}, padded)
    got_state, got = step(create_state(params, tx, seed=0), {}, text_only)
    assert float(got["loss"]) == float(want["loss"])
    for new, old in zip(jax.tree.leaves(got_state.trainable), jax.tree.leaves(want_state.trainable)):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))


def test_text_only_stream_shards_over_the_mesh(tiny_tokenizer_dir):
    """Empty patch arrays still split over the data axes of an 8-device mesh."""
    tokenizer = PromptTokenizer.from_pretrained(tiny_tokenizer_dir)
    params = jax.tree.map(jnp.asarray, init_params(CFG, seed=3, std=0.05))
    words = ["cat", "dog", "red", "park", "moon", "clock", "horse", "coffee"]
    streams = [_stream([{"text": f"a {w}"}], tokenizer, 1, patches_per_row=0) for w in words]
    local = {k: np.concatenate([np.asarray(s[k]) for s in streams]) for k in BATCH_KEYS}
    local["patches"] = local["patches"].reshape(8, 0, CFG.vision.patch_dim)
    mesh = parallel.make_mesh((-1, 1, 1))
    placed = parallel.host_to_global(local, mesh, batch_axis=0)
    assert placed["patches"].shape == (8, 0, CFG.vision.patch_dim)
    sharded = np.asarray(jax.jit(lambda p, b: embed(p, b, CFG, RUN))(params, placed))
    np.testing.assert_allclose(sharded, np.asarray(embed(params, local, CFG, RUN)), rtol=1e-6, atol=1e-6)
