"""Items -> embeddings over a device mesh: the batching loop of `Embedder.encode` and of the trainer's evaluation.

Work goes in windows of items (max(8 batches, 64) items: host memory stays bounded on large
inputs): a thread pool prepares a window's items (`prepare_item`: prompt, tokens, media), they are
sorted by size so that a batch holds similar inputs (little padding, few new shapes), and each
batch is packed into shape buckets (`choose_shapes`), placed as global arrays split over the mesh's
batch axes (every process prepares the same items and fills its own devices), embedded, and
gathered back in input order on every process.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unite_jax import parallel
from unite_jax.data import media
from unite_jax.data.items import prepare_item
from unite_jax.data.packing import BATCH_KEYS, PackableInput, choose_shapes, pack_batch
from unite_jax.data.tokenize import PromptTokenizer
from unite_jax.model.config import ModelConfig
from unite_jax.model.embedder import embed
from unite_jax.model.options import RunOptions
from unite_jax.model.sharding import traced_on
from unite_jax.progress import Progress


class MeshEncoder:
    """Encodes items with the parameters it is given, batched by size over `mesh`'s `batch_axes`.

    run: how to compute; the vision tile is chosen per batch (`run.vision_block` is replaced).
    params given to `encode` must already be placed on the mesh (replicated, or with any sharding).
    """

    def __init__(self, cfg: ModelConfig, run: RunOptions, tokenizer: PromptTokenizer,
                 processor: media.ProcessorConfig, mesh: Mesh, *, batch_axes: Sequence[str] = ("data",),
                 max_text_tokens: int | None = 2048, num_workers: int | None = None):
        self.cfg, self.run = cfg, run
        self.tokenizer, self.processor = tokenizer, processor
        self.max_text_tokens = max_text_tokens
        self.num_workers = num_workers or min(8, os.cpu_count() or 1)
        self.num_shards = math.prod(mesh.shape[a] for a in batch_axes)
        self.batch_sharding = NamedSharding(mesh, PartitionSpec(tuple(batch_axes)))
        # cfg and run are static: each vision tile size the packer picks compiles once. Traced on the mesh:
        # activations stay on its batch axes, and splash attention runs under shard_map (model/sharding.py).
        self._forward = jax.jit(traced_on(mesh, embed), static_argnames=("cfg", "run"),
                                out_shardings=self.batch_sharding)

    def prepare(self, item: dict, index: int = 0) -> PackableInput:
        """Validates one item, pre-processes its media and tokenises its prompt (host side)."""
        return prepare_item(item, index, self.tokenizer, self.processor, self.max_text_tokens)

    def encode(self, params: dict, items: Sequence[dict], *, batch_size: int = 16,
               progress: Progress | None = None) -> np.ndarray:
        """float32 [len(items), hidden] L2-normalised embeddings, in input order."""
        items = list(items)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        rows_per_shard = math.ceil(batch_size / self.num_shards)
        rows = rows_per_shard * self.num_shards
        out = np.zeros((len(items), self.cfg.hidden_size), np.float32)
        window = max(rows * 8, 64)  # items prepared at a time: bounds host memory on large inputs
        with concurrent.futures.ThreadPoolExecutor(self.num_workers) as pool:
            for window_start in range(0, len(items), window):
                indices = range(window_start, min(window_start + window, len(items)))
                prepared = list(pool.map(lambda i: self.prepare(items[i], i), indices))
                # similar sizes share a batch, so padding (and new shapes) stay small
                order = sorted(range(len(prepared)), key=lambda k: (prepared[k].num_patches, prepared[k].num_tokens))
                pending = []
                for batch_start in range(0, len(order), rows):
                    members = order[batch_start:batch_start + rows]
                    vectors = self.encode_batch(params, [prepared[k] for k in members], rows_per_shard)
                    pending.append(([indices[k] for k in members], vectors))
                for targets, vectors in pending:  # read back after every batch of the window was dispatched
                    out[targets] = parallel.to_host(vectors)[:len(targets)]
                if progress is not None:
                    progress.update(len(indices))
        return out

    def encode_batch(self, params: dict, batch_items: list[PackableInput], rows_per_shard: int) -> jax.Array:
        """One batch of prepared items (at most num_shards * rows_per_shard) -> [rows, hidden] on the mesh."""
        seq_len, patch_budget, vision_block = choose_shapes(batch_items, self.num_shards, rows_per_shard)
        packed = pack_batch(batch_items, num_shards=self.num_shards, rows_per_shard=rows_per_shard,
                            seq_len=seq_len, patch_budget=patch_budget, pad_id=self.tokenizer.pad_id,
                            patch_dim=self.cfg.vision.patch_dim, merge_size=self.cfg.vision.spatial_merge_size,
                            position_mode=self.run.positions, vision_block=vision_block)
        batch = {key: parallel.put(packed[key], self.batch_sharding, wait=False) for key in BATCH_KEYS}
        return self._forward(params, batch, self.cfg, self.run.replace(vision_block=vision_block))
