"""UNITE embedding forward: tokens + packed patches -> L2-normalised vectors.

The batch is laid out per data shard (DESIGN.md, "Static shapes and packing"):
text rows [batch, seq] with batch = shards * rows_per_shard, and one packed row
of patches per shard. `merged_dest` sends each merged visual token to its pad
slot in the shard's flattened text rows; padding tokens point at one extra
"dump" slot that is dropped afterwards. The keys it reads are the packer's BATCH_KEYS
(`unite_jax.data.packing`): input_ids, attention_mask, position_ids, patches, patch_segment_ids,
patch_positions, merged_dest.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from unite_jax.model.config import ModelConfig
from unite_jax.model.options import RunOptions
from unite_jax.model.sharding import constrain_batch
from unite_jax.model.text import text_model
from unite_jax.model.vision import vision_tower


def input_embeddings(params: dict, batch: dict, cfg: ModelConfig, run: RunOptions) -> jnp.ndarray:
    """Token embeddings with the vision tower's merged tokens scattered into the pad slots.

    batch["input_ids"]: [batch, seq]; batch["patches"]: [shards, patches, patch_dim] (patches may be 0:
    a text-only batch, for which the vision tower does not run);
    batch["merged_dest"]: [shards, patches / 4] int32 index into the shard's rows_per_shard * seq slots.
    Returns [batch, seq, hidden] in the compute dtype.
    """
    dtype = jnp.dtype(run.compute_dtype)
    input_ids = batch["input_ids"]
    num_rows, seq = input_ids.shape
    shards = batch["patches"].shape[0]
    embeds = constrain_batch(jnp.take(params["model"]["embed_tokens"]["embedding"], input_ids, axis=0).astype(dtype))
    if batch["patches"].shape[1] == 0:  # a text-only stream (data.<stream>_patches_per_row=0)
        return embeds
    visual = vision_tower(params["visual"], batch["patches"], batch["patch_segment_ids"],
                          batch["patch_positions"], cfg, run).astype(dtype)  # [shards, merged, hidden]
    hidden = embeds.shape[-1]
    slots = embeds.reshape(shards, (num_rows // shards) * seq, hidden)
    slots = jnp.concatenate([slots, jnp.zeros((shards, 1, hidden), dtype)], axis=1)  # + dump slot
    slots = constrain_batch(jax.vmap(lambda s, dest, vis: s.at[dest].set(vis))(slots, batch["merged_dest"], visual))
    return constrain_batch(slots[:, :-1].reshape(num_rows, seq, hidden))


def embed(params: dict, batch: dict, cfg: ModelConfig, run: RunOptions, rng=None) -> jnp.ndarray:
    """[batch, hidden] float32 L2-normalised UNITE embeddings (last position, after the final norm).

    Rows are left-padded and end with <|endoftext|>, so the pooled token is always the last column.
    cfg (architecture) and run (dtypes, kernels, LoRA, vision tile) are static under jit.
    rng: PRNG key for LoRA dropout in the LLM (params from `lora.with_lora`, `run.lora` set), or None for
    a deterministic forward. The vision tower is frozen and has no dropout. For GradCache use
    `lambda p, b, k=None: embed(p, b, cfg, run, k)`.
    """
    _check_batch(batch)
    embeds = input_embeddings(params, batch, cfg, run)
    hidden = text_model(params["model"], embeds, batch["attention_mask"], batch["position_ids"], cfg, run, rng=rng)
    last = hidden[:, -1].astype(jnp.float32)
    return last / jnp.maximum(jnp.linalg.norm(last, axis=-1, keepdims=True), 1e-12)


def _check_batch(batch: dict) -> None:
    """Trace-time shape and dtype checks of the packed batch (errors name the key; nothing runs on device)."""
    rows, seq = batch["input_ids"].shape
    chex.assert_shape(batch["attention_mask"], (rows, seq))
    chex.assert_shape(batch["position_ids"], (rows, 3, seq))
    chex.assert_type([batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["merged_dest"],
                      batch["patch_segment_ids"], batch["patch_positions"]], int)
    shards, patches = batch["patches"].shape[:2]
    chex.assert_shape(batch["patch_segment_ids"], (shards, patches))
    chex.assert_shape(batch["patch_positions"], (shards, patches, 2))
    chex.assert_shape(batch["merged_dest"], (shards, None))
    if rows % shards:
        raise ValueError(f"{rows} text rows do not split over {shards} patch shards")
