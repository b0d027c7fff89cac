"""Hugging Face directory <-> Orbax model directory, in the direction the source implies (`convert`).

Both directions stream: HF -> Orbax reads the safetensors tensor by tensor into the tree that
Orbax then writes without a copy (peak: the weights once); Orbax -> HF restores groups of leaves
and writes tensor by tensor (peak: one restore group plus one tensor). Both write their output
atomically and carry the tokenizer and pre-processor files along.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from unite_jax.convert import hf
from unite_jax.convert import safetensors_io as st
from unite_jax.convert.dtypes import dominant_dtype, numpy_dtype
from unite_jax.convert.model_card import model_card
from unite_jax.convert.orbax_io import RESTORE_GROUP_BYTES, LeafReader, ModelDirError, directory_listing
from unite_jax.convert.orbax_model import (
    MODEL_META,
    PARAMS_DIR,
    REQUIRED_ASSETS,
    check_destination,
    check_tokenizer,
    config_from_meta,
    copy_assets,
    describe_formats,
    find_model_dir,
    is_hf_dir,
    model_dir_writer,
    read_meta,
    resolve_model_dir,
    save_model_dir,
)
from unite_jax.model.config import ModelConfig

DEFAULT_MAX_SHARD_BYTES = st.DEFAULT_MAX_SHARD_BYTES
MODEL_CARD = "README.md"


def hf_to_model_dir(src: str, dst: str, *, dtype: Any = None, overwrite: bool = False) -> str:
    """Converts a Hugging Face Qwen2-VL / UNITE directory (4.x or 5.x layout) to an Orbax model directory.

    Keeps the checkpoint's dtype unless `dtype` is given; carries the tokenizer and pre-processor
    files; checks that the tokenizer fits the config before reading any weights. Returns `dst`.
    Peak host memory: the weights once (read tensor by tensor into the tree, which Orbax writes
    without a copy).
    """
    _require_hf_dir(src)
    check_destination(dst, overwrite, [src])
    cfg = ModelConfig.from_pretrained(src)
    check_tokenizer(src, cfg)
    checkpoint = st.Checkpoint(src)
    layout = hf.detect_layout(checkpoint.names(), src)
    stored = dominant_dtype((checkpoint.info(n).dtype, checkpoint.info(n).nbytes) for n in checkpoint.names())
    out_dtype = numpy_dtype(dtype) if dtype is not None else stored
    params = hf.load_hf_params(src, cfg, dtype=out_dtype)
    return save_model_dir(dst, params, cfg, assets_from=src, source=f"Hugging Face directory {os.path.abspath(src)}",
                          extra={"converted_from": "huggingface", "hf_layout": layout, "hf_dtype": stored.name},
                          overwrite=overwrite)


def _require_hf_dir(src: str) -> None:
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src}: no such directory")
    if not is_hf_dir(src):
        raise ModelDirError(f"{src}: not a Hugging Face directory (needs {hf.HF_CONFIG} and *.safetensors); "
                            f"it holds {directory_listing(src)}")


def model_dir_to_hf(src: str, dst: str, *, dtype: Any = None, overwrite: bool = False,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    group_bytes: int = RESTORE_GROUP_BYTES) -> str:
    """Exports an Orbax model directory (or finished training workdir) as a Hugging Face directory.

    Writes, atomically: safetensors shards of at most `max_shard_bytes` (+ index when several;
    transformers 4.x key names, which 4.x and 5.x load), config.json, the tokenizer and pre-processor
    files, and README.md (a model card with the UNITE pooling recipe and the source metadata).
    Keeps the stored dtype unless `dtype` is given (cast tensor by tensor). Streams: at most one
    restore group plus one tensor is in host memory. Returns `dst`.
    """
    model_dir = resolve_model_dir(src)
    meta = read_meta(model_dir)
    cfg = config_from_meta(meta, model_dir)
    missing = [name for name in REQUIRED_ASSETS if not os.path.isfile(os.path.join(model_dir, name))]
    if missing:
        raise ModelDirError(f"{model_dir}: no {', '.join(missing)}; exporting needs the model's tokenizer "
                            "(save the model directory with assets_from=...)")
    check_tokenizer(model_dir, cfg)
    check_destination(dst, overwrite, [src, model_dir])
    reader = LeafReader(os.path.join(model_dir, PARAMS_DIR), cfg, MODEL_META, group_bytes)
    out_dtype = numpy_dtype(dtype) if dtype is not None else None
    specs = [_pending_tensor(m, reader, out_dtype or reader.stored[m.path][1]) for m in hf.name_table(cfg, "4.x")]
    dtype_name = dominant_dtype((s.dtype, s.nbytes) for s in specs).name
    with model_dir_writer(dst, overwrite=overwrite, sources=[src, model_dir]) as tmp:
        if jax.process_index() == 0:  # host-side files only: one writer is enough
            st.save_sharded(specs, tmp, max_shard_bytes)
            reader.close()
            hf.write_config(tmp, cfg, dtype_name)
            copy_assets(model_dir, tmp)
            with open(os.path.join(tmp, MODEL_CARD), "w", encoding="utf-8") as f:
                f.write(model_card(cfg, meta, dtype_name=dtype_name))
    return os.path.abspath(dst)


def _pending_tensor(m: hf.TensorMapping, reader: LeafReader, dtype: np.dtype) -> st.PendingTensor:
    """One HF tensor, read from the model directory only when the writer reaches it."""

    def load() -> np.ndarray:
        leaf = reader.get(m.path)
        part = leaf if m.layer is None else leaf[m.layer]
        return hf.to_hf_layout(m.kind, part.astype(dtype, copy=False), m.hf_shape)

    return st.PendingTensor(m.hf_name, m.hf_shape, np.dtype(dtype), load)


def conversion_direction(src: str) -> str:
    """"hf_to_orbax" for a Hugging Face directory, "orbax_to_hf" for a model directory or finished
    workdir; raises naming what each format needs when `src` is neither."""
    if not os.path.exists(src):
        raise FileNotFoundError(f"{src}: no such directory")
    if not os.path.isdir(src):
        raise ModelDirError(f"{src}: not a directory ({describe_formats()})")
    if is_hf_dir(src):
        return "hf_to_orbax"
    if find_model_dir(src) is not None:
        return "orbax_to_hf"
    raise ModelDirError(f"{src}: neither format ({describe_formats()}); it holds {directory_listing(src)}")


def convert(src: str, dst: str, *, dtype: Any = None, overwrite: bool = False,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> tuple[str, str]:
    """Converts in the direction `src` implies; returns (direction, absolute dst)."""
    direction = conversion_direction(src)
    if direction == "hf_to_orbax":
        return direction, hf_to_model_dir(src, dst, dtype=dtype, overwrite=overwrite)
    return direction, model_dir_to_hf(src, dst, dtype=dtype, overwrite=overwrite, max_shard_bytes=max_shard_bytes)
