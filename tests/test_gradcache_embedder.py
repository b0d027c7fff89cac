"""GradCache on the real (tiny) UNITE embedder: gradients equal the plain full-batch gradients."""

import jax
import jax.numpy as jnp
import numpy as np

from unite_jax.data import media
from unite_jax.data.items import prepare_item
from unite_jax.data.packing import BATCH_KEYS, choose_shapes, pack_batch
from unite_jax.data.tokenize import PromptTokenizer
from unite_jax.gradcache import gradcache_value_and_grad
from unite_jax.loss import mamcl_loss
from unite_jax.model.config import preset
from unite_jax.model.embedder import embed
from unite_jax.model.options import RunOptions
from unite_jax.model.params import init_params


def _packed_chunks(chunks, tokenizer, processor, cfg):
    """Packs each chunk of items with one shared shape (so all chunks compile once)."""
    prepared = [[prepare_item(item, i, tokenizer, processor) for i, item in enumerate(chunk)] for chunk in chunks]
    rows = len(chunks[0])
    shapes = [choose_shapes(p, 1, rows) for p in prepared]
    seq, block = max(s[0] for s in shapes), max(s[2] for s in shapes)
    budget = max(-(-s[1] // block) * block for s in shapes)
    packed = [pack_batch(p, num_shards=1, rows_per_shard=rows, seq_len=seq, patch_budget=budget,
                         pad_id=tokenizer.pad_id, patch_dim=cfg.vision.patch_dim, vision_block=block) for p in prepared]
    return packed, block


def _stack(packed):
    """Stacks packed chunks on a leading [num_chunks] axis (GradCache's "stacked" layout)."""
    return {k: np.stack([b[k] for b in packed]) for k in BATCH_KEYS}


def test_gradcache_equals_full_batch_gradient_on_tiny_embedder(tiny_tokenizer_dir):
    rng = np.random.default_rng(0)
    tokenizer = PromptTokenizer.from_pretrained(tiny_tokenizer_dir)
    processor = media.ProcessorConfig(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)
    cfg = preset("tiny")
    image = lambda: rng.integers(0, 256, (int(rng.integers(40, 120)), int(rng.integers(40, 120)), 3), np.uint8)
    queries = [[{"text": "a red circle"}, {"text": "<|IMAGE|> same object", "image": image()}],
               [{"video": [image()[:40, :40] for _ in range(4)]}, {"image": image()}]]
    candidates = [[{"image": image()}, {"image": image()}],
                  [{"text": "the digit seven moves left"}, {"text": "a photo of a dog"}]]
    modality = jnp.array([2, 2, 1, 1])  # chunk-major order of the candidates
    packed, block = _packed_chunks(queries + candidates, tokenizer, processor, cfg)
    query_batch, candidate_batch = _stack(packed[:2]), _stack(packed[2:])
    params = jax.tree.map(jnp.asarray, init_params(cfg, seed=3, std=0.2))
    embed_fn = lambda p, b: embed(p, b, cfg, RunOptions(vision_block=block))

    def loss_fn(q, c):
        return mamcl_loss(q, c, modality, temperature=0.5)

    # GradCache: one packed chunk at a time
    loss, _, grads = jax.jit(lambda p: gradcache_value_and_grad(
        embed_fn, loss_fn, p, query_batch, candidate_batch, num_chunks=2))(params)

    # plain: every chunk embedded inside one differentiated function
    def full_loss(p):
        q = jnp.concatenate([embed_fn(p, jax.tree.map(lambda x, k=k: x[k], query_batch)) for k in range(2)])
        c = jnp.concatenate([embed_fn(p, jax.tree.map(lambda x, k=k: x[k], candidate_batch)) for k in range(2)])
        return loss_fn(q, c)[0]

    expected_loss, expected = jax.jit(jax.value_and_grad(full_loss))(params)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    assert float(expected_loss) > 0.1
    jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, atol=1e-6, rtol=1e-4), grads, expected)
    # the gradient reaches the vision tower and the LLM alike
    assert float(jnp.abs(grads["visual"]["blocks"]["attn"]["qkv"]["kernel"]).max()) > 0
    assert float(jnp.abs(grads["model"]["layers"]["mlp"]["up_proj"]["kernel"]).max()) > 0
