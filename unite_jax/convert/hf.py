"""Hugging Face Qwen2-VL checkpoints <-> the parameter tree of `unite_jax.model.params`.

Conversion is a name table plus three transforms:
- `linear`: torch `weight` [out, in] <-> our `kernel` [in, out] (a transpose);
- `conv`:   the patch-embedding Conv3d weight [E, C, T, P, P] <-> our kernel
            [C*T*P*P, E] (`weight.reshape(E, -1).T`), since kernel == stride
            makes the convolution a matmul over flattened patches;
- `copy`:   norms, biases and the token embedding [V, H] are stored as in torch.
Per-layer tensors (`visual.blocks.N.*`, `model.layers.N.*`) go into / come out of
row N of our stacked arrays.

Two key layouts exist in the wild and both are read:
- "4.x": `visual.*`, `model.layers.N.*`, `model.embed_tokens.weight`,
  `model.norm.weight`, `lm_head.weight` (transformers 4.x, and what
  `save_pretrained` writes in 5.x too; the published UNITE checkpoints);
- "5.x": `model.visual.*`, `model.language_model.*`, `lm_head.weight`
  (transformers 5.x module tree, found in checkpoints saved from a state dict).
Writing always uses "4.x", which both transformers 4.x and 5.x load.

Loading reads one tensor at a time from memory-mapped files and writes it,
converted to the target dtype, straight into a preallocated array of the tree,
so peak host memory is the tree itself plus at most one tensor's pages.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from unite_jax import files
from unite_jax.convert import safetensors_io as st
from unite_jax.convert.dtypes import dominant_dtype
from unite_jax.model.config import ModelConfig
from unite_jax.model.params import Params, flatten_tree, param_shapes

LAYOUTS = ("4.x", "5.x")
# Top-level tree key -> HF name prefix, per layout.
_PREFIXES = {
    "4.x": {"visual": "visual.", "model": "model.", "lm_head": "lm_head."},
    "5.x": {"visual": "model.visual.", "model": "model.language_model.", "lm_head": "lm_head."},
}
_STACKED = ("blocks", "layers")  # tree keys whose leaves carry a leading layer axis
_LEAF_NAMES = {"kernel": "weight", "embedding": "weight"}  # our leaf name -> torch's
# Buffers some checkpoints carry that are recomputed from the config, never parameters.
_HARMLESS_SUFFIXES = (".inv_freq",)
_MAX_LISTED = 20  # names listed in an error before "... and N more"
HF_CONFIG = "config.json"


class CheckpointError(ValueError):
    """A checkpoint does not match the model config; the message names the tensor and file."""


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    """One HF tensor and where it lives in our tree.

    `path` is the tree path of the (stacked) leaf, `layer` the row of the
    leading layer axis (None for unstacked leaves), `kind` the transform
    ("linear", "conv" or "copy"), `hf_shape` the torch tensor's shape.
    """

    hf_name: str
    path: tuple[str, ...]
    layer: int | None
    kind: str
    hf_shape: tuple[int, ...]


# ---------------------------------------------------------------- name table
def name_table(cfg: ModelConfig, layout: str = "4.x") -> list[TensorMapping]:
    """Every HF tensor of a model with this config, in tree order; no `lm_head` when tied."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    table = []
    for path, shape in flatten_tree(param_shapes(cfg)).items():
        stacked = len(path) > 1 and path[1] in _STACKED
        kind = _kind(path)
        layer_shape = shape[1:] if stacked else shape
        hf_shape = _hf_shape(kind, layer_shape, cfg)
        for layer in range(shape[0]) if stacked else [None]:
            table.append(TensorMapping(_hf_name(path, layer, layout), path, layer, kind, hf_shape))
    return table


def _hf_name(path: tuple[str, ...], layer: int | None, layout: str) -> str:
    """("visual", "blocks", "attn", "qkv", "kernel"), 3 -> "visual.blocks.3.attn.qkv.weight" (4.x)."""
    parts = list(path[1:-1]) + [_LEAF_NAMES.get(path[-1], path[-1])]
    if layer is not None:
        parts.insert(1, str(layer))  # path[1] is "blocks" / "layers"
    return _PREFIXES[layout][path[0]] + ".".join(parts)


def _kind(path: tuple[str, ...]) -> str:
    if path[-3:] == ("patch_embed", "proj", "kernel"):
        return "conv"
    return "linear" if path[-1] == "kernel" else "copy"


def _hf_shape(kind: str, shape: tuple[int, ...], cfg: ModelConfig) -> tuple[int, ...]:
    """The torch shape of one (unstacked) tensor whose tree shape is `shape`."""
    if kind == "conv":
        v = cfg.vision
        return (shape[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    if kind == "linear":
        return tuple(reversed(shape))
    return tuple(shape)


def detect_layout(names: Iterable[str], where: str = "checkpoint") -> str:
    """The key layout, "4.x" or "5.x", from the tensor names present; an error when neither or both appear."""
    names = list(names)
    has_5x = any(n.startswith(("model.language_model.", "model.visual.")) for n in names)
    has_4x = any(n.startswith(("model.layers.", "model.embed_tokens.", "model.norm.", "visual.")) for n in names)
    if has_5x and has_4x:
        raise CheckpointError(
            f"{where}: mixes transformers 4.x names (visual.*, model.layers.*) and 5.x names "
            "(model.visual.*, model.language_model.*)")
    if not (has_5x or has_4x):
        raise CheckpointError(
            f"{where}: no Qwen2-VL tensors found (expected visual.* / model.layers.* or "
            f"model.visual.* / model.language_model.*); first names: {names[:5]}")
    return "5.x" if has_5x else "4.x"


# ---------------------------------------------------------------- transforms
def to_tree_layout(kind: str, hf_tensor: np.ndarray) -> np.ndarray:
    """A torch tensor as our leaf (a view where possible): linear [out, in] -> [in, out];
    conv [E, C, T, P, P] -> [C*T*P*P, E]; copy unchanged."""
    if kind == "linear":
        return hf_tensor.T
    if kind == "conv":
        return hf_tensor.reshape(hf_tensor.shape[0], -1).T
    return hf_tensor


def to_hf_layout(kind: str, leaf: np.ndarray, hf_shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of `to_tree_layout`, C-contiguous: our leaf -> the torch tensor [*hf_shape]."""
    if kind == "linear":
        leaf = leaf.T
    elif kind == "conv":
        leaf = leaf.T.reshape(hf_shape)
    return np.ascontiguousarray(leaf)


# ---------------------------------------------------------------- loading
def load_hf(model_dir: str, dtype: Any = "float32") -> tuple[ModelConfig, Params]:
    """(config, params) of a Hugging Face Qwen2-VL directory (config.json + safetensors)."""
    cfg = ModelConfig.from_pretrained(model_dir)
    return cfg, load_hf_params(model_dir, cfg, dtype)


def load_hf_params(model_dir: str, cfg: ModelConfig, dtype: Any = "float32") -> Params:
    """The parameter tree (numpy, layout of `unite_jax.model.params`) of a HF checkpoint directory.

    Every tensor is cast to `dtype` ("bfloat16" gives `ml_dtypes.bfloat16` leaves) as it is copied
    in. The checkpoint is checked
    against the config from its headers before any data is read: missing
    tensors, wrong shapes and unexpected extra tensors are errors. `lm_head` is
    loaded only for untied embeddings; a tied checkpoint may still carry
    `lm_head.weight`, which is then ignored.
    """
    dtype = np.dtype(dtype)
    st.dtype_code(dtype)  # fails early, naming the dtype, if it is not a tensor dtype
    checkpoint = st.Checkpoint(model_dir)
    layout = detect_layout(checkpoint.names(), model_dir)
    table = name_table(cfg, layout)
    _check_checkpoint(checkpoint, table, cfg, layout)
    params = _allocate(param_shapes(cfg), dtype)
    leaves = flatten_tree(params)
    # Read in file order so each file is scanned front to back once.
    for m in sorted(table, key=lambda m: (checkpoint.info(m.hf_name).path, checkpoint.info(m.hf_name).begin)):
        dst = leaves[m.path] if m.layer is None else leaves[m.path][m.layer]
        src = checkpoint.read(m.hf_name)  # memory map: no host copy in the file's dtype
        np.copyto(dst, to_tree_layout(m.kind, src), casting="same_kind")
        del src
    return params


def _check_checkpoint(checkpoint: st.Checkpoint, table: list[TensorMapping], cfg: ModelConfig, layout: str) -> None:
    """Raises CheckpointError listing missing tensors, wrong shapes or dtypes, and unexpected tensors."""
    where = checkpoint.directory
    expected = {m.hf_name: m for m in table}
    missing = [name for name in expected if name not in checkpoint]
    if missing:
        raise CheckpointError(
            f"{where}: {len(missing)} tensor(s) of the config's model are missing from the checkpoint "
            f"({layout} layout): {listing(missing)}")
    problems = []
    for name, m in expected.items():
        info = checkpoint.info(name)
        if info.shape != m.hf_shape:
            problems.append(f"{info.path}: tensor {name!r} has shape {list(info.shape)}, "
                            f"expected {list(m.hf_shape)} from config.json")
        elif info.dtype.kind not in "fV":  # ml_dtypes floats (bfloat16, float8) have kind "V"
            problems.append(f"{info.path}: tensor {name!r} has dtype {info.dtype}, expected a float dtype")
    if problems:
        raise CheckpointError("checkpoint does not match the config:\n  " + "\n  ".join(problems))
    extra = [n for n in checkpoint.names() if n not in expected and not _ignorable(n, checkpoint, cfg)]
    if extra:
        files = sorted({os.path.basename(checkpoint.info(n).path) for n in extra})
        raise CheckpointError(
            f"{where}: {len(extra)} unexpected tensor(s) (in {files}) that a Qwen2-VL model of this config "
            f"does not have: {listing(extra)}")


def _ignorable(name: str, checkpoint: st.Checkpoint, cfg: ModelConfig) -> bool:
    """Rotary buffers, and a tied model's `lm_head.weight` (a copy of the embedding) of the right shape."""
    if name.endswith(_HARMLESS_SUFFIXES):
        return True
    t = cfg.text
    return (name == "lm_head.weight" and t.tie_word_embeddings
            and checkpoint.info(name).shape == (t.vocab_size, t.hidden_size))


def _allocate(shapes: Mapping[str, Any], dtype: np.dtype) -> Params:
    """A tree of uninitialised arrays (every entry is overwritten by the loader)."""
    return {k: _allocate(v, dtype) if isinstance(v, Mapping) else np.empty(v, dtype) for k, v in shapes.items()}


# ---------------------------------------------------------------- saving
def hf_tensor_specs(params: Params, cfg: ModelConfig) -> list[st.PendingTensor]:
    """The model's HF tensors (4.x names) as pending tensors: shape and dtype now, values on demand.

    Leaves may be numpy or jax arrays; a tensor's values are fetched to the host
    (one layer of one leaf) only when the writer asks for them.
    """
    leaves = _check_tree(params, cfg)
    return [st.PendingTensor(m.hf_name, m.hf_shape, np.dtype(leaves[m.path].dtype),
                             _loader(leaves[m.path], m))
            for m in name_table(cfg, "4.x")]


def _loader(leaf: Any, m: TensorMapping):
    def load() -> np.ndarray:
        part = leaf if m.layer is None else leaf[m.layer]  # indexes jax arrays on device
        return to_hf_layout(m.kind, np.asarray(part), m.hf_shape)

    return load


def hf_tensors(params: Params, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, torch-layout numpy array) for every tensor, 4.x names, one at a time."""
    for spec in hf_tensor_specs(params, cfg):
        yield spec.name, spec.load()


def save_hf_params(params: Params, cfg: ModelConfig, out_dir: str,
                   max_shard_bytes: int = st.DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Writes a directory `Qwen2VLForConditionalGeneration.from_pretrained` loads; returns its file names.

    Tensors are saved in the leaves' dtype, in shards of at most
    `max_shard_bytes` (`model.safetensors`, or numbered shards plus an index),
    then `config.json` from `cfg.to_hf_dict()` with the saved dtype, last, so a
    directory with a config.json has complete weights.
    """
    specs = hf_tensor_specs(params, cfg)
    written = st.save_sharded(specs, out_dir, max_shard_bytes)
    write_config(out_dir, cfg, dominant_dtype((s.dtype, s.nbytes) for s in specs).name)
    return written + [HF_CONFIG]


def write_config(out_dir: str, cfg: ModelConfig, dtype_name: str) -> str:
    """OUT_DIR/config.json from `cfg.to_hf_dict()` with the weights' dtype under both transformers' names
    (atomically; write it last, so a directory with a config.json has complete weights). Returns its path."""
    config = cfg.to_hf_dict()
    config["dtype"] = dtype_name  # transformers 5.x
    config["torch_dtype"] = dtype_name  # transformers 4.x
    path = os.path.join(out_dir, HF_CONFIG)
    files.write_json(path, config, sort_keys=True)
    return path


def _check_tree(params: Params, cfg: ModelConfig) -> dict[tuple[str, ...], Any]:
    """The flattened tree, after checking its paths and shapes against `param_shapes(cfg)`."""
    leaves = flatten_tree(params)
    missing, extra, wrong = tree_mismatches(cfg, {p: tuple(np.shape(x)) for p, x in leaves.items()})
    if missing or extra:
        raise CheckpointError(f"parameter tree does not match the config: missing {listing(missing)}, "
                              f"unexpected {listing(extra)}")
    if wrong:
        raise CheckpointError("parameter tree does not match the config:\n  " + "\n  ".join(wrong))
    return leaves


def tree_mismatches(cfg: ModelConfig, shapes: Mapping[tuple[str, ...], tuple[int, ...]]
                    ) -> tuple[list[str], list[str], list[str]]:
    """(missing paths, unexpected paths, "path: shape [..], expected [..]" lines) of a flattened tree's
    shapes against `param_shapes(cfg)`; wrong shapes are only listed for paths present in both."""
    expected = flatten_tree(param_shapes(cfg))
    missing = ["/".join(p) for p in expected if p not in shapes]
    extra = ["/".join(p) for p in shapes if p not in expected]
    wrong = [f"{'/'.join(p)}: shape {list(shapes[p])}, expected {list(s)}"
             for p, s in expected.items() if p in shapes and tuple(shapes[p]) != tuple(s)]
    return missing, extra, wrong


# ---------------------------------------------------------------- helpers
def listing(names: list[str], limit: int = _MAX_LISTED) -> str:
    """`[a, b, c ... and N more]`: at most `limit` names of a list, for error messages."""
    shown = ", ".join(names[:limit])
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return f"[{shown}{more}]"
