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

from unite_jax import files, parallel
from unite_jax.convert import orbax_model
from unite_jax.data import media, tiny_tokenizer
from unite_jax.data.tokenize import TOKENIZER_FILES
from unite_jax.model.config import ModelConfig, preset

ASSETS_DIR = "assets"  # a random init's tokenizer and pre-processor files, in the workdir


def init_kind(init: str) -> str:
    """"random", "hf" or "model" (an Orbax model dir or a finished workdir); raises when none fits."""
    if init == "random":
        return "random"
    if not init:
        raise ValueError("model.init is empty: set --config.model.init to a Hugging Face directory (e.g. "
                         "Qwen2-VL-2B-Instruct), an Orbax model directory, a finished training workdir, or 'random'")
    if not os.path.isdir(init) and not files.is_remote(init):
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
    """A directory with tokenizer.json (+ friends) and preprocessor_config.json for this run.

    A random init writes WORKDIR/assets (atomically, by process 0, on the shared workdir) from
    model.tokenizer, or the tiny preset's own; the other kinds carry their assets.
    """
    kind = init_kind(model_cfg.init)
    if kind == "hf":
        return model_cfg.init
    if kind == "model":
        return orbax_model.resolve_model_dir(model_cfg.init)
    assets = os.path.join(workdir, ASSETS_DIR)
    if not os.path.exists(os.path.join(assets, "tokenizer.json")):
        primary = process_index == 0
        with files.atomic_directory(assets, primary=primary, barrier=parallel.barrier) as tmp:
            if primary:
                _write_assets(model_cfg, tmp)
    return assets


def _write_assets(model_cfg, directory: str) -> None:
    if model_cfg.tokenizer:
        for name in TOKENIZER_FILES:
            if os.path.exists(os.path.join(model_cfg.tokenizer, name)):
                shutil.copy(os.path.join(model_cfg.tokenizer, name), directory)
        if not os.path.exists(os.path.join(directory, "tokenizer.json")):
            raise FileNotFoundError(f"model.tokenizer={model_cfg.tokenizer!r} has no tokenizer.json")
        source_processor = os.path.join(model_cfg.tokenizer, media.PREPROCESSOR_CONFIG)
        if os.path.exists(source_processor):
            shutil.copy(source_processor, directory)
        else:
            media.ProcessorConfig().save_pretrained(directory)
    elif model_cfg.preset == "tiny":
        tiny_tokenizer.write_assets(directory)
    else:
        raise ValueError(f"model.init=random with preset {model_cfg.preset!r} needs model.tokenizer: a "
                         "directory with the model's tokenizer.json (e.g. a Qwen2-VL-Instruct download)")


def load_base_params(model_cfg, cfg: ModelConfig, dtype: str, shardings: dict, seed: int) -> dict:
    """The starting parameters in `dtype`, as global arrays placed with `shardings`."""
    kind = init_kind(model_cfg.init)
    if kind == "random":
        from unite_jax.model.params import init_params

        return parallel.place_tree(init_params(cfg, seed=seed, dtype=dtype, std=model_cfg.init_std), shardings,
                                   in_place=True)
    if kind == "hf":
        from unite_jax.convert.hf import load_hf_params

        return parallel.place_tree(load_hf_params(model_cfg.init, cfg, dtype=dtype), shardings, in_place=True)
    params, _, _ = orbax_model.load_model_dir(orbax_model.resolve_model_dir(model_cfg.init), dtype=dtype,
                                              sharding=shardings)
    return params


