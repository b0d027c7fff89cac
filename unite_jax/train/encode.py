"""Encoding with the weights being trained, for periodic evaluation inside a run.

Unlike `Embedder` (replicated weights on the local devices), this uses the
training mesh and the training parameter shardings, so it works on every host
of a pod: each process pre-processes the same items, the packed batch becomes a
global array (each process fills its own devices), and the embeddings are
gathered back to every host.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unite_jax.data.items import prepare_item
from unite_jax.data.media import ProcessorConfig
from unite_jax.data.packing import choose_shapes, pack_batch
from unite_jax.data.tokenize import PromptTokenizer
from unite_jax.model.config import ModelConfig
from unite_jax.data.packing import BATCH_KEYS
from unite_jax.model.embedder import embed
from unite_jax.model.options import RunOptions
from unite_jax.parallel import BATCH_AXES


def _to_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _to_host(array: jax.Array) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def make_encoder(params_fn: Callable[[], dict], cfg: ModelConfig, run: RunOptions, tokenizer: PromptTokenizer,
                 processor: ProcessorConfig, mesh: Mesh, *, batch_size: int = 32,
                 max_text_tokens: int = 2048) -> Callable[[Sequence[dict]], np.ndarray]:
    """encode(items) -> float32 [N, D] L2-normalised, with the parameters params_fn() returns at call time."""
    num_shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    rows_per_shard = max(1, math.ceil(batch_size / num_shards))
    rows = rows_per_shard * num_shards
    text_sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    forward = jax.jit(embed, static_argnames=("cfg", "run"))
    # no dropout and no remat: evaluation takes no gradient
    eval_run = run.replace(remat="none", lora=None if run.lora is None else dataclasses.replace(run.lora, dropout=0.0))

    def encode(items: Sequence[dict]) -> np.ndarray:
        items = list(items)
        with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            prepared = list(pool.map(lambda i: prepare_item(items[i], i, tokenizer, processor, max_text_tokens),
                                     range(len(items))))
        order = sorted(range(len(prepared)), key=lambda k: (prepared[k].num_patches, prepared[k].num_tokens))
        out = np.zeros((len(items), cfg.hidden_size), np.float32)
        params = params_fn()
        for start in range(0, len(order), rows):
            members = order[start:start + rows]
            batch_items = [prepared[k] for k in members]
            seq_len, patch_budget, block = choose_shapes(batch_items, num_shards, rows_per_shard)
            packed = pack_batch(batch_items, num_shards=num_shards, rows_per_shard=rows_per_shard, seq_len=seq_len,
                                patch_budget=patch_budget, pad_id=tokenizer.pad_id, patch_dim=cfg.vision.patch_dim,
                                merge_size=cfg.vision.spatial_merge_size, position_mode=run.positions,
                                vision_block=block)
            batch = {key: _to_global(packed[key], text_sharding) for key in BATCH_KEYS}
            vectors = _to_host(forward(params, batch, cfg, eval_run.replace(vision_block=block)))
            out[members] = vectors[:len(members)]
        return out

    return encode
