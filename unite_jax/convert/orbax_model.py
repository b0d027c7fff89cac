"""The project's model directory ("Orbax model directory"): its format, and saving and loading one.

An Orbax model directory holds one model, ready to encode, train from or export:

    unite_model.json   {"format": "unite-jax-model", "version": 1,
                        "config": the HF config.json dict (`ModelConfig.to_hf_dict()`),
                        "dtype": the parameters' dtype name ("float32", "bfloat16"),
                        "lora": null | {"rank", "alpha", "targets", "merged": true} (LoRA the weights
                                were trained with, already folded into params/),
                        "source": free text (HF directory, or training workdir/stage/steps),
                        "created": ISO time, "extra": {...} (caller metadata, e.g. the trainer's)}
    params/            an Orbax checkpoint of the full parameter tree (`unite_jax.model.params` names)
    tokenizer.json, tokenizer_config.json, ... , preprocessor_config.json
                       the source's tokenizer and pre-processor files, copied verbatim (ASSET_FILES)

A training workdir whose stage has finished holds one at WORKDIR/model; every
reader here accepts the workdir too (`resolve_model_dir`). Conversions to and
from Hugging Face directories are in `unite_jax.convert.conversions`; the Orbax
reading and writing of the parameter tree (in groups of leaves, without extra
copies) in `unite_jax.convert.orbax_io`.

Directories are written atomically (`unite_jax.files.atomic_directory`): a crash
never leaves a half-written directory under the final name. Only local (or
mounted) file systems are supported.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from unite_jax import files, parallel
from unite_jax.convert.dtypes import dominant_dtype, numpy_dtype
from unite_jax.convert.orbax_io import (
    RESTORE_GROUP_BYTES,
    LeafReader,
    ModelDirError,
    check_leaves,
    directory_listing,
    save_tree,
)
from unite_jax.data.media import PROCESSOR_FILES
from unite_jax.data.tokenize import TOKENIZER_FILES, PromptTokenizer
from unite_jax.model.config import ModelConfig
from unite_jax.model.params import Params, flatten_tree, unflatten_tree

MODEL_META = "unite_model.json"
FORMAT = "unite-jax-model"
VERSION = 1
PARAMS_DIR = "params"
WORKDIR_MODEL = "model"  # a training workdir keeps its finished stage's model directory here
HF_CONFIG = "config.json"
# Tokenizer and pre-processor files carried from directory to directory, byte for byte.
ASSET_FILES = TOKENIZER_FILES + PROCESSOR_FILES + ("generation_config.json",)
REQUIRED_ASSETS = ("tokenizer.json",)

__all__ = ["ASSET_FILES", "MODEL_META", "PARAMS_DIR", "RESTORE_GROUP_BYTES", "ModelDirError", "asset_files",
           "check_destination", "check_tokenizer", "config_from_meta", "copy_assets", "describe_formats",
           "find_model_dir", "is_hf_dir", "is_model_dir", "load_model_dir", "model_dir_writer", "read_meta",
           "resolve_model_dir", "save_model_dir"]


# ---------------------------------------------------------------- recognising directories
def is_model_dir(path: str) -> bool:
    """True when `path` holds `unite_model.json` (an Orbax model directory of this project)."""
    return os.path.isfile(os.path.join(path, MODEL_META))


def is_hf_dir(path: str) -> bool:
    """True when `path` holds `config.json` and at least one `*.safetensors` file."""
    if not os.path.isfile(os.path.join(path, HF_CONFIG)):
        return False
    return any(name.endswith(".safetensors") for name in os.listdir(path))


def find_model_dir(path: str) -> str | None:
    """`path` if it is a model directory, PATH/model if it is a finished training workdir, else None."""
    if not os.path.isdir(path):
        return None
    if is_model_dir(path):
        return path
    inner = os.path.join(path, WORKDIR_MODEL)
    if is_model_dir(inner):
        return inner
    return None


def resolve_model_dir(path: str) -> str:
    """The model directory `path` names: itself, or WORKDIR/model for a finished training workdir.

    Raises FileNotFoundError naming what was expected and listing what the directory holds.
    """
    found = find_model_dir(path)
    if found is not None:
        return found
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such directory (expected an Orbax model directory)")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory (expected an Orbax model directory)")
    raise FileNotFoundError(
        f"{path}: not an Orbax model directory (expected {MODEL_META} and {PARAMS_DIR}/ in it) nor a finished "
        f"training workdir (expected {WORKDIR_MODEL}/{MODEL_META}); it holds {directory_listing(path)}")


def describe_formats() -> str:
    """One sentence saying what each directory format needs (for error messages)."""
    return (f"a Hugging Face directory needs {HF_CONFIG} and *.safetensors; an Orbax model directory needs "
            f"{MODEL_META} and {PARAMS_DIR}/; a finished training workdir needs {WORKDIR_MODEL}/{MODEL_META}")


# ---------------------------------------------------------------- metadata
def read_meta(model_dir: str) -> dict[str, Any]:
    """The checked contents of MODEL_DIR/unite_model.json; errors name the file and the field."""
    path = os.path.join(model_dir, MODEL_META)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{model_dir}: no {MODEL_META} (not an Orbax model directory); "
                                f"it holds {directory_listing(model_dir)}")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{path}: cannot read ({e})") from e
    if not isinstance(meta, dict):
        raise ModelDirError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise ModelDirError(f"{path}: field 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    version = meta.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= VERSION:
        raise ModelDirError(f"{path}: field 'version' is {version!r}, expected an integer in [1, {VERSION}] "
                            "(a newer unite-jax wrote it?)")
    if not isinstance(meta.get("config"), dict):
        raise ModelDirError(f"{path}: field 'config' is missing or not an object (expected the HF config dict)")
    if not isinstance(meta.get("dtype"), str):
        raise ModelDirError(f"{path}: field 'dtype' is missing or not a string (expected e.g. 'bfloat16')")
    _check_lora_meta(meta.get("lora"), path)
    if os.path.isdir(os.path.join(model_dir, "lora")):
        raise ModelDirError(f"{model_dir}: holds a lora/ directory of unmerged LoRA weights, which this version "
                            "neither writes nor reads: fold them into params/ (lora.merge_lora) and remove lora/")
    if meta.get("extra") is not None and not isinstance(meta["extra"], dict):
        raise ModelDirError(f"{path}: field 'extra' must be an object or null, got {type(meta['extra']).__name__}")
    return meta


def config_from_meta(meta: Mapping[str, Any], model_dir: str = "<model>") -> ModelConfig:
    """`ModelConfig` from meta["config"]; a missing or malformed field names unite_model.json."""
    path = os.path.join(model_dir, MODEL_META)
    try:
        return ModelConfig.from_hf_dict(meta["config"])
    except KeyError as e:
        raise ModelDirError(f"{path}: field 'config' lacks {e.args[0]!r}") from e
    except (TypeError, ValueError) as e:
        raise ModelDirError(f"{path}: field 'config' is not a valid Qwen2-VL config ({e})") from e


def _check_lora_meta(lora: Any, path: str) -> None:
    if lora is None:
        return
    if not isinstance(lora, dict):
        raise ModelDirError(f"{path}: field 'lora' must be null or an object, got {type(lora).__name__}")
    rank, alpha = lora.get("rank"), lora.get("alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ModelDirError(f"{path}: field 'lora.rank' is {rank!r}, expected a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ModelDirError(f"{path}: field 'lora.alpha' is {alpha!r}, expected a number")
    if lora.get("merged") is not True:
        raise ModelDirError(f"{path}: field 'lora.merged' is {lora.get('merged')!r}; only LoRA merged into params/ "
                            "is supported (true)")


def _make_meta(cfg: ModelConfig, dtype_name: str, lora_meta: dict | None, source: str,
               extra: Mapping[str, Any] | None) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "config": cfg.to_hf_dict(),
        "dtype": dtype_name,
        "lora": lora_meta,
        "source": source,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "extra": dict(extra) if extra else {},
    }


# ---------------------------------------------------------------- assets (tokenizer, pre-processor)
def check_tokenizer(asset_dir: str, cfg: ModelConfig) -> None:
    """Raises when ASSET_DIR's tokenizer.json is missing, unreadable or does not fit the model config.

    Fits: the Qwen2-VL special tokens exist, <|image_pad|>/<|video_pad|> have the config's ids, and
    every token id is a row of the embedding (a tokenizer of another model fails one of these).
    """
    tokenizer = PromptTokenizer.from_pretrained(asset_dir)  # FileNotFoundError / ValueError name the file
    tokenizer.check_model_ids(cfg.image_token_id, cfg.video_token_id)
    try:
        tokenizer.check_vocab_size(cfg.text.vocab_size)
    except ValueError as e:
        raise ModelDirError(str(e)) from e


def asset_files(asset_dir: str) -> list[str]:
    """The ASSET_FILES present in `asset_dir`, in ASSET_FILES order."""
    return [name for name in ASSET_FILES if os.path.isfile(os.path.join(asset_dir, name))]


def copy_assets(asset_dir: str, out_dir: str) -> list[str]:
    """Copies the tokenizer / pre-processor files of `asset_dir` verbatim; returns their names."""
    names = asset_files(asset_dir)
    for name in names:
        shutil.copyfile(os.path.join(asset_dir, name), os.path.join(out_dir, name))
    return names


# ---------------------------------------------------------------- destinations
def check_destination(dst: str, overwrite: bool, sources: Sequence[str] = ()) -> None:
    """Refuses a non-empty `dst` unless `overwrite`, a file in its place, and a `dst` that holds a source."""
    dst_real = os.path.realpath(dst)
    for src in sources:
        src_real = os.path.realpath(src)
        if src_real == dst_real or src_real.startswith(dst_real + os.sep):
            raise ModelDirError(f"destination {dst} is (or contains) the source {src}: writing it would destroy "
                                "the source; choose another destination")
    if not os.path.lexists(dst):
        return
    if not os.path.isdir(dst):
        raise FileExistsError(f"destination {dst} exists and is not a directory")
    entries = os.listdir(dst)
    if entries and not overwrite:
        raise FileExistsError(f"destination {dst} is not empty (holds {directory_listing(dst)}); pass overwrite=True "
                              "(--overwrite) to replace it")


def model_dir_writer(dst: str, *, overwrite: bool = False, sources: Sequence[str] = ()):
    """`check_destination`, then `files.atomic_directory` for every process of the run (process 0 renames)."""
    dst = os.path.abspath(dst)
    check_destination(dst, overwrite, sources)
    return files.atomic_directory(dst, primary=jax.process_index() == 0, barrier=parallel.barrier)


# ---------------------------------------------------------------- save / load
def save_model_dir(out_dir: str, params: Params, cfg: ModelConfig, *, assets_from: str | None,
                   lora_meta: Mapping[str, Any] | None = None, source: str = "",
                   extra: Mapping[str, Any] | None = None, overwrite: bool = False) -> str:
    """Writes an Orbax model directory atomically; returns its absolute path.

    params: the full tree (`unite_jax.model.params` layout; numpy or jax arrays, sharded or not),
        with any LoRA already merged (`lora.merge_lora`).
    assets_from: a directory whose tokenizer / pre-processor files (ASSET_FILES) are copied; its
        tokenizer.json must exist and fit `cfg` (`check_tokenizer`). None writes no assets (the
        directory then cannot be encoded with or exported until they are added).
    lora_meta: {"rank", "alpha", "targets"} of the LoRA merged into params, recorded for reference.
    source, extra: free text, and JSON-serialisable metadata stored under "extra".
    Multi-process: call it from EVERY process with the same arguments; all take part in the Orbax
    save of sharded arrays, process 0 writes the small files and renames the directory.
    """
    out_dir = os.path.abspath(out_dir)
    stored = {p: (tuple(int(d) for d in np.shape(v)), np.dtype(v.dtype)) for p, v in flatten_tree(params).items()}
    check_leaves(stored, cfg, "save_model_dir: params", MODEL_META)
    if assets_from is not None:
        check_tokenizer(assets_from, cfg)
    lora = None
    if lora_meta is not None:
        lora = {"merged": True, **dict(lora_meta)}
        lora.setdefault("targets", [])
    _check_lora_meta(lora, "save_model_dir: lora_meta")
    dtype_name = dominant_dtype((dtype, int(np.prod(shape)) * dtype.itemsize) for shape, dtype in stored.values())
    meta = _make_meta(cfg, dtype_name.name, lora, source, extra)
    json.dumps(meta)  # fail before writing anything if `extra` is not JSON-serialisable
    with model_dir_writer(out_dir, overwrite=overwrite, sources=[assets_from] if assets_from else []) as tmp:
        save_tree(os.path.join(tmp, PARAMS_DIR), params)
        if jax.process_index() == 0:
            if assets_from is not None:
                copy_assets(assets_from, tmp)
            _write_meta(tmp, meta)  # last: a directory with unite_model.json is complete
    return out_dir


def _write_meta(directory: str, meta: Mapping[str, Any]) -> None:
    files.write_json(os.path.join(directory, MODEL_META), meta)


def load_model_dir(path: str, *, dtype: Any = None, sharding: Any = None,
                   group_bytes: int = RESTORE_GROUP_BYTES) -> tuple[Params, ModelConfig, dict[str, Any]]:
    """(params, cfg, meta) of an Orbax model directory or a finished training workdir.

    params: the full tree; numpy arrays in the stored dtype, or `dtype` if given. With `sharding`
        (one `jax.sharding.Sharding` for every leaf, or a tree of them mirroring params) the leaves are
        global jax arrays placed leaf by leaf (`parallel.put`); every process reads the full leaf and
        keeps only its devices' shards.
    cfg: `ModelConfig.from_hf_dict(meta["config"])` (the architecture).
    Errors name the file and field: missing / corrupt unite_model.json, wrong "format", missing
    params/, a parameter tree that does not match the config.
    """
    model_dir = resolve_model_dir(path)
    meta = read_meta(model_dir)
    cfg = config_from_meta(meta, model_dir)
    reader = LeafReader(os.path.join(model_dir, PARAMS_DIR), cfg, MODEL_META, group_bytes)
    target = numpy_dtype(dtype) if dtype is not None else None
    shardings = _sharding_lookup(sharding)
    flat: dict[tuple[str, ...], Any] = {}
    for p in reader.order:
        leaf = reader.get(p)
        if target is not None and leaf.dtype != target:
            leaf = leaf.astype(target)
        flat[p] = leaf if shardings is None else parallel.put(leaf, shardings(p))
    reader.close()
    return unflatten_tree(flat), cfg, meta


def _sharding_lookup(sharding: Any) -> Callable[[tuple[str, ...]], Any] | None:
    """A function path -> Sharding, from None, one Sharding, or a tree of them."""
    if sharding is None:
        return None
    if isinstance(sharding, jax.sharding.Sharding):
        return lambda path: sharding
    flat = flatten_tree(sharding)

    def lookup(path):
        if path not in flat:
            raise ModelDirError(f"load_model_dir: the sharding tree has no entry for {'/'.join(path)}")
        return flat[path]

    return lookup
