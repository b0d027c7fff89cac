"""`Embedder`: the public inference API.

    from unite_jax import Embedder
    embedder = Embedder.from_pretrained("path/to/Unite-Instruct-Qwen2-VL-2B")
    vectors = embedder.encode([{"text": "a cat"}, {"image": "cat.jpg"},
                               {"text": "<|IMAGE|> what is this?", "image": "cat.jpg"}])

Each item is a dict with `text` (str), `image` (path, PIL image, HxWx3 uint8
array, or a list of them) and/or `video` (path, list of paths, or a list of
HxWx3 uint8 frames); an `id` key is allowed and ignored (the item schema of
`unite_jax.data.items`). `encode` returns float32 [N, D] rows, L2-normalised, in
input order.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unite_jax import parallel
from unite_jax.data import media
from unite_jax.data.packing import PackableInput
from unite_jax.data.tokenize import PromptTokenizer
from unite_jax.encoding import MeshEncoder
from unite_jax.model.config import ModelConfig
from unite_jax.model.options import RunOptions, default_attention, default_dtype
from unite_jax.progress import Progress


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
        tokenizer.check_model_ids(cfg.image_token_id, cfg.video_token_id)
        self.mesh = Mesh(np.asarray(list(devices or jax.local_devices())), ("data",))
        self.params = parallel.place_tree(params, NamedSharding(self.mesh, PartitionSpec()), in_place=True)
        self.encoder = MeshEncoder(cfg, self.run, tokenizer, processor, self.mesh, batch_axes=("data",),
                                   max_text_tokens=max_text_tokens, num_workers=num_workers)

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

    # ------------------------------------------------------------------ encoding
    def prepare(self, item: dict, index: int = 0) -> PackableInput:
        """Validates one item, pre-processes its media and tokenises its prompt (host side)."""
        return self.encoder.prepare(item, index)

    def encode(self, items: Sequence[dict], batch_size: int = 16, show_progress: bool = False) -> np.ndarray:
        """float32 [len(items), hidden] L2-normalised embeddings, in input order.

        show_progress: a progress line (items/s, ETA) on stderr, redrawn in place on a terminal.
        """
        items = list(items)
        progress = Progress(len(items), "encode") if show_progress else None
        return self.encoder.encode(self.params, items, batch_size=batch_size, progress=progress)
