"""Writes a randomly initialised UNITE model as a Hugging Face directory (weights, config,
tokenizer, pre-processor config): the starting point of the demo and of smoke runs that
have no real checkpoint at hand."""

from __future__ import annotations

import os

from unite_jax.convert.hf import save_hf_params
from unite_jax.data import tiny_tokenizer
from unite_jax.model.config import preset
from unite_jax.model.params import init_params


def write_random_model(out_dir: str, *, seed: int = 0) -> str:
    """The `tiny` preset with random weights, the tiny tokenizer and its small pixel budget, saved to `out_dir`
    (so that a CPU encodes images in milliseconds)."""
    cfg = preset("tiny")
    os.makedirs(out_dir, exist_ok=True)
    save_hf_params(init_params(cfg, seed=seed, std=0.05), cfg, out_dir)
    tiny_tokenizer.write_assets(out_dir)
    return out_dir
