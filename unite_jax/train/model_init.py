"""Where a stage's starting weights come from (`model.init`) and how they reach the devices.

model.init is one of:
  random               the `model.preset` architecture with random weights (`tiny` on a CPU);
  a Hugging Face dir   config.json + *.safetensors (Qwen2-VL-Instruct, released UNITE models);
  an Orbax model dir   written by `launch/convert.py` or by the end of a training stage;
  a training workdir   whose last stage is finished (its WORKDIR/model is used).
The tokenizer and pre-processor files ("assets") travel with the weights; a
random init takes them from `model.tokenizer` (the tiny preset builds its own).
"""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np

from unite_jax.convert import orbax_model
from unite_jax.data import media, tiny_tokenizer
from unite_jax.model.config import ModelConfig, preset

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "chat_template.json", "chat_template.jinja")
# The tiny preset's pixel budget: small enough that a CPU trains on images in seconds.
TINY_MIN_PIXELS = 16 * 28 * 28
TINY_MAX_PIXELS = 256 * 28 * 28


def init_kind(init: str) -> str:
    """"random", "hf" or "model" (an Orbax model dir or a finished workdir); raises when none fits."""
    if init == "random":
        return "random"
    if not init:
        raise ValueError("model.init is empty: set --config.model.init to a Hugging Face directory (e.g. "
                         "Qwen2-VL-2B-Instruct), an Orbax model directory, a finished training workdir, or 'random'")
    if not os.path.isdir(init) and "://" not in init:
        raise FileNotFoundError(f"model.init={init!r}: no such directory")
    if orbax_model.is_hf_dir(init):
        return "hf"
    try:
        orbax_model.resolve_model_dir(init)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"model.init={init!r} is neither a Hugging Face directory (config.json + "
                                f"*.safetensors) nor an Orbax model directory / finished training workdir: {e}") from e
    return "model"


def model_config(model_cfg) -> ModelConfig:
    """The architecture named by model.init (or model.preset for a random init)."""
    kind = init_kind(model_cfg.init)
    if kind == "random":
        return preset(model_cfg.preset)
    if kind == "hf":
        return ModelConfig.from_pretrained(model_cfg.init)
    model_dir = orbax_model.resolve_model_dir(model_cfg.init)
    return orbax_model.config_from_meta(orbax_model.read_meta(model_dir), model_dir)


def prepare_assets(model_cfg, workdir: str, process_index: int) -> str:
    """A directory with tokenizer.json (+ friends) and preprocessor_config.json for this run."""
    kind = init_kind(model_cfg.init)
    if kind == "hf":
        return model_cfg.init
    if kind == "model":
        return orbax_model.resolve_model_dir(model_cfg.init)
    assets = os.path.join(workdir, "assets")
    if process_index == 0 and not os.path.exists(os.path.join(assets, "tokenizer.json")):
        tmp = assets + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        if model_cfg.tokenizer:
            for name in TOKENIZER_FILES:
                if os.path.exists(os.path.join(model_cfg.tokenizer, name)):
                    shutil.copy(os.path.join(model_cfg.tokenizer, name), tmp)
            if not os.path.exists(os.path.join(tmp, "tokenizer.json")):
                raise FileNotFoundError(f"model.tokenizer={model_cfg.tokenizer!r} has no tokenizer.json")
            source_processor = os.path.join(model_cfg.tokenizer, media.PREPROCESSOR_CONFIG)
            if os.path.exists(source_processor):
                shutil.copy(source_processor, tmp)
            else:
                media.ProcessorConfig().save_pretrained(tmp)
        elif model_cfg.preset == "tiny":
            tiny_tokenizer.build(tmp)
            media.ProcessorConfig(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS).save_pretrained(tmp)
        else:
            raise ValueError(f"model.init=random with preset {model_cfg.preset!r} needs model.tokenizer: a "
                             "directory with the model's tokenizer.json (e.g. a Qwen2-VL-Instruct download)")
        shutil.rmtree(assets, ignore_errors=True)
        os.replace(tmp, assets)
    _barrier("assets")
    return assets


def place_host_tree(tree: dict, shardings: dict) -> dict:
    """Host numpy leaves -> global jax arrays with the given shardings, leaf by leaf (host copies freed as
    they go). Every process holds the same host values; each fills only its own devices' shards."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out[key] = place_host_tree(value, shardings[key])
        else:
            host = np.asarray(value)
            out[key] = jax.block_until_ready(
                jax.make_array_from_callback(host.shape, shardings[key], lambda index, host=host: host[index]))
            del host
        tree[key] = None
    return out


def load_base_params(model_cfg, cfg: ModelConfig, dtype: str, shardings: dict, seed: int) -> dict:
    """The starting parameters in `dtype`, as global arrays placed with `shardings`."""
    kind = init_kind(model_cfg.init)
    if kind == "random":
        from unite_jax.model.params import init_params

        return place_host_tree(init_params(cfg, seed=seed, dtype=dtype, std=model_cfg.init_std), shardings)
    if kind == "hf":
        from unite_jax.convert.hf import load_hf_params

        return place_host_tree(load_hf_params(model_cfg.init, cfg, dtype=dtype), shardings)
    params, _, _ = orbax_model.load_model_dir(orbax_model.resolve_model_dir(model_cfg.init), dtype=dtype,
                                              sharding=shardings)
    return params


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
