"""`Embedder`: the public inference API.

    from unite_jax import Embedder
    embedder = Embedder.from_pretrained("path/to/Unite-Instruct-Qwen2-VL-2B")
    vectors = embedder.encode([{"text": "a cat"}, {"image": "cat.jpg"},
                               {"text": "<|IMAGE|> what is this?", "image": "cat.jpg"}])

Each item is a dict with `text` (str), `image` (path, PIL image, HxWx3 uint8
array, or a list of them) and/or `video` (path, list of paths, or a list of
HxWx3 uint8 frames); an `id` key is allowed and ignored. `encode` returns
float32 [N, D] rows, L2-normalised, in input order.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unite_jax.data import media
from unite_jax.data.items import prepare_item
from unite_jax.data.packing import BATCH_KEYS, PackableInput, choose_shapes, pack_batch
from unite_jax.data.tokenize import PromptTokenizer
from unite_jax.model.config import ModelConfig
from unite_jax.model.embedder import embed
from unite_jax.model.options import RunOptions, default_attention, default_dtype


class Embedder:
    """UNITE embedder: items -> L2-normalised vectors, batched by size over all local devices."""

    def __init__(self, params: dict, cfg: ModelConfig, tokenizer: PromptTokenizer,
                 processor: media.ProcessorConfig, *, run: RunOptions | None = None,
                 max_text_tokens: int | None = 2048, devices: Sequence[jax.Device] | None = None,
                 num_workers: int | None = None):
        """params: the parameter tree (`unite_jax.model.params`); its leaves are replaced in place by
        device arrays replicated over `devices` (default: all local devices), so host copies are freed
        as they go. run: how to compute (default `RunOptions()`: float32, XLA attention; the vision tile
        is chosen per batch). num_workers: threads that pre-process items."""
        self.cfg = cfg
        self.run = run or RunOptions()
        self.tokenizer = tokenizer
        self.processor = processor
        self.max_text_tokens = max_text_tokens
        self.num_workers = num_workers or min(8, os.cpu_count() or 1)
        tokenizer.check_model_ids(cfg.image_token_id, cfg.video_token_id)
        devices = list(devices or jax.local_devices())
        self.mesh = Mesh(np.asarray(devices), ("data",))
        self._data_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.params = _device_put_in_place(params, replicated)
        # cfg is static: each vision block size the packer picks compiles once
        self._forward = jax.jit(embed, static_argnames=("cfg", "run"),
                                in_shardings=(replicated, self._data_sharding), out_shardings=self._data_sharding)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model_dir: str, *, dtype: str | None = None, positions: str = "sequential",
                        attention_impl: str | None = None, max_text_tokens: int | None = 2048,
                        **processor_overrides: Any) -> "Embedder":
        """Loads a Hugging Face Qwen2-VL / UNITE directory (config.json, *.safetensors, tokenizer.json,
        preprocessor_config.json), or an Orbax model directory of this project (unite_model.json,
        params/, tokenizer and pre-processor files), or a training workdir whose stage finished
        (its model/ directory).

        dtype: parameter and compute dtype; default float32 on CPU (bit-faithful to the
        reference) and bfloat16 on GPU/TPU. positions: "sequential" (UNITE) or "mrope".
        """
        from unite_jax.convert import orbax_model
        from unite_jax.convert.hf import load_hf_params

        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"model directory {model_dir!r} does not exist")
        platform = jax.default_backend()
        dtype = dtype or default_dtype(platform)
        run = RunOptions(positions=positions, compute_dtype=dtype, param_dtype=dtype,
                         attention_impl=attention_impl or default_attention(platform, dtype))
        orbax_dir = None if orbax_model.is_hf_dir(model_dir) else orbax_model.find_model_dir(model_dir)
        if orbax_dir is not None:  # the tokenizer and pre-processor files travel inside the model directory
            cfg = orbax_model.config_from_meta(orbax_model.read_meta(orbax_dir), orbax_dir)
            asset_dir = orbax_dir
        else:
            cfg = ModelConfig.from_pretrained(model_dir)
            asset_dir = model_dir
        tokenizer = PromptTokenizer.from_pretrained(asset_dir)
        processor = media.ProcessorConfig.from_pretrained(asset_dir, **processor_overrides)
        if orbax_dir is not None:
            params, _, _ = orbax_model.load_model_dir(orbax_dir, dtype=dtype)
        else:
            params = load_hf_params(model_dir, cfg, dtype=dtype)
        return cls(params, cfg, tokenizer, processor, run=run, max_text_tokens=max_text_tokens)

    # ------------------------------------------------------------------ host side
    def prepare(self, item: dict, index: int = 0) -> PackableInput:
        """Validates one item, pre-processes its media and tokenises its prompt (host side)."""
        return prepare_item(item, index, self.tokenizer, self.processor, self.max_text_tokens)

    # ------------------------------------------------------------------ encoding
    def encode(self, items: Sequence[dict], batch_size: int = 16, show_progress: bool = False) -> np.ndarray:
        """float32 [len(items), hidden] L2-normalised embeddings, in input order."""
        items = list(items)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        num_shards = len(self.mesh.devices.ravel())
        rows_per_shard = math.ceil(batch_size / num_shards)
        rows = rows_per_shard * num_shards
        out = np.zeros((len(items), self.cfg.hidden_size), np.float32)
        chunk = max(rows * 8, 64)  # inputs pre-processed at a time: bounds host memory on large inputs
        start_time, done = time.time(), 0
        with concurrent.futures.ThreadPoolExecutor(self.num_workers) as pool:
            for chunk_start in range(0, len(items), chunk):
                indices = range(chunk_start, min(chunk_start + chunk, len(items)))
                prepared = list(pool.map(lambda i: self.prepare(items[i], i), indices))
                # similar sizes share a batch, so padding (and new shapes) stay small
                order = sorted(range(len(prepared)), key=lambda k: (prepared[k].num_patches, prepared[k].num_tokens))
                pending = []
                for batch_start in range(0, len(order), rows):
                    members = order[batch_start:batch_start + rows]
                    vectors = self._encode_batch([prepared[k] for k in members], num_shards, rows_per_shard)
                    pending.append(([indices[k] for k in members], vectors))
                for targets, vectors in pending:
                    out[targets] = np.asarray(vectors)[:len(targets)]
                done += len(indices)
                if show_progress:
                    _progress(done, len(items), start_time)
        return out

    def _encode_batch(self, batch_items: list[PackableInput], num_shards: int, rows_per_shard: int) -> jax.Array:
        seq_len, patch_budget, vision_block = choose_shapes(batch_items, num_shards, rows_per_shard)
        batch = pack_batch(batch_items, num_shards=num_shards, rows_per_shard=rows_per_shard, seq_len=seq_len,
                           patch_budget=patch_budget, pad_id=self.tokenizer.pad_id,
                           patch_dim=self.cfg.vision.patch_dim, merge_size=self.cfg.vision.spatial_merge_size,
                           position_mode=self.run.positions, vision_block=vision_block)
        batch = {key: jax.device_put(batch[key], self._data_sharding) for key in BATCH_KEYS}
        return self._forward(self.params, batch, self.cfg, self.run.replace(vision_block=vision_block))


def _device_put_in_place(tree: dict, sharding) -> dict:
    """Moves a nested dict of host arrays to devices leaf by leaf, replacing each leaf in the dict.

    Each host array is released as soon as its device copy exists (when nothing else holds it), so
    loading a 7B model in bf16 peaks at one copy of the weights plus one leaf, not two copies.
    """
    for key, value in tree.items():
        if isinstance(value, dict):
            _device_put_in_place(value, sharding)
        else:
            # wait for each copy: an async transfer would keep every host leaf alive until all finish
            tree[key] = jax.block_until_ready(jax.device_put(value, sharding))
            del value
    return tree


def _progress(done: int, total: int, start_time: float) -> None:
    elapsed = time.time() - start_time
    rate = done / max(elapsed, 1e-9)
    eta = (total - done) / max(rate, 1e-9)
    print(f"\rencoded {done}/{total} items  {rate:.1f} items/s  ETA {eta:.0f}s", end="" if done < total else "\n",
          file=sys.stderr, flush=True)
