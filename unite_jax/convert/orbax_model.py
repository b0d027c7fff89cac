"""The project's model directory ("Orbax model directory") and conversions to and from Hugging Face.

An Orbax model directory holds one model, ready to encode, train from or export:

    unite_model.json   {"format": "unite-jax-model", "version": 1,
                        "config": the HF config.json dict (`ModelConfig.to_hf_dict()`),
                        "dtype": the parameters' dtype name ("float32", "bfloat16"),
                        "lora": null | {"rank", "alpha", "targets", "merged"},
                        "source": free text (HF directory, or training workdir/stage/steps),
                        "created": ISO time, "extra": {...} (caller metadata, e.g. the trainer's)}
    params/            an Orbax checkpoint of the full parameter tree (`unite_jax.model.params` names)
    lora/              optional: an Orbax checkpoint of an unmerged LoRA tree
                       {"model": {"layers": {"self_attn": {"q_proj": {"lora_a" [L, in, r],
                        "lora_b" [L, r, out]}}, ...}}}; present only when "lora"."merged" is false,
                       and then folded into the kernels on load: W + (alpha / rank) * A @ B
    tokenizer.json, tokenizer_config.json, ... , preprocessor_config.json
                       the source's tokenizer and pre-processor files, copied verbatim (ASSET_FILES)

A training workdir whose stage has finished holds one at WORKDIR/model; every
reader here accepts the workdir too (`resolve_model_dir`).

Memory: parameters are restored from Orbax in groups of leaves (at most
`RESTORE_GROUP_BYTES` each, or one leaf when a leaf is larger), so loading
peaks at the tree plus one group, and exporting to Hugging Face never holds
more than one group plus one tensor: the HF writer asks for tensors in the
order the groups are read. Saving hands Orbax the caller's host arrays without
the defensive copy Orbax makes by default and without compression, so a save
holds one copy of the weights (the caller's) plus Orbax's buffers of small
metadata; the checkpointer is synchronous, so nobody mutates the arrays while
they are written.

Directories are written atomically: everything goes into a sibling temporary
directory `.NAME.unite-tmp`, which is renamed to NAME when complete, so a crash
never leaves a half-written directory under the final name. Only local (or
mounted) file systems are supported.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np

from unite_jax.convert import safetensors_io as st
from unite_jax.convert.hf import flatten_tree, tree_mismatches
from unite_jax.model.config import ModelConfig
from unite_jax.model.params import Params, param_shapes

MODEL_META = "unite_model.json"
FORMAT = "unite-jax-model"
VERSION = 1
PARAMS_DIR = "params"
LORA_DIR = "lora"
WORKDIR_MODEL = "model"  # a training workdir keeps its finished stage's model directory here
HF_CONFIG = "config.json"
MODEL_CARD = "README.md"
# Tokenizer and pre-processor files carried from directory to directory, byte for byte.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.json", "chat_template.jinja")
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json")
ASSET_FILES = TOKENIZER_FILES + PROCESSOR_FILES + ("generation_config.json",)
REQUIRED_ASSETS = ("tokenizer.json",)
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
# Leaves restored per Orbax call when loading or exporting. Restoring a leaf briefly holds it twice
# (tensorstore decodes its single chunk into a fresh array), so export peaks near
# max(2 x largest leaf, group); 256 MiB keeps the group below the large leaves of real models.
RESTORE_GROUP_BYTES = 256 << 20
_TMP_SUFFIX = ".unite-tmp"
_OLD_SUFFIX = ".unite-old"
_MAX_LISTED = 12


class ModelDirError(ValueError):
    """A model directory (or a conversion source / destination) is wrong; the message names the file and field."""


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
        f"training workdir (expected {WORKDIR_MODEL}/{MODEL_META}); it holds {_listing(path)}")


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
                                f"it holds {_listing(model_dir)}")
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
    if not isinstance(lora.get("merged"), bool):
        raise ModelDirError(f"{path}: field 'lora.merged' is {lora.get('merged')!r}, expected true or false")


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
    from unite_jax.data.tokenize import PromptTokenizer

    tokenizer = PromptTokenizer.from_pretrained(asset_dir)  # FileNotFoundError / ValueError name the file
    tokenizer.check_model_ids(cfg.image_token_id, cfg.video_token_id)
    size = tokenizer.tokenizer.get_vocab_size(with_added_tokens=True)
    if size > cfg.text.vocab_size:
        raise ModelDirError(
            f"{tokenizer.source}: the tokenizer has {size} tokens but the model's embedding has "
            f"{cfg.text.vocab_size} rows (config vocab_size): tokenizer and model do not match")


def asset_files(asset_dir: str) -> list[str]:
    """The ASSET_FILES present in `asset_dir`, in ASSET_FILES order."""
    return [name for name in ASSET_FILES if os.path.isfile(os.path.join(asset_dir, name))]


def copy_assets(asset_dir: str, out_dir: str) -> list[str]:
    """Copies the tokenizer / pre-processor files of `asset_dir` verbatim; returns their names."""
    names = asset_files(asset_dir)
    for name in names:
        shutil.copyfile(os.path.join(asset_dir, name), os.path.join(out_dir, name))
    return names


# ---------------------------------------------------------------- atomic directories
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
        raise FileExistsError(f"destination {dst} is not empty (holds {_listing(dst)}); pass overwrite=True "
                              "(--overwrite) to replace it")


def _tmp_path(dst: str) -> str:
    """The sibling temporary directory of `dst`: the same name on every process, so all write into it."""
    parent, name = os.path.split(os.path.abspath(dst))
    return os.path.join(parent, f".{name}{_TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_directory(dst: str, *, overwrite: bool = False, sources: Sequence[str] = ()) -> Iterator[str]:
    """Yields a fresh temporary directory next to `dst`; on success renames it to `dst`.

    On an exception the temporary directory is removed and `dst` is left as it was. With
    `overwrite` an existing `dst` is moved aside, the new one renamed in, and the old one deleted.
    Multi-process: every process must enter and leave together (barriers); process 0 creates,
    renames and deletes, the others only write into the directory (it must be on a shared file
    system). A process that fails leaves the others waiting at the barrier, as any collective would.
    """
    dst = os.path.abspath(dst)
    check_destination(dst, overwrite, sources)
    tmp = _tmp_path(dst)
    primary = jax.process_index() == 0
    if primary:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed earlier attempt
        os.makedirs(tmp)
    _barrier("unite_model_dir_tmp_created")
    try:
        yield tmp
        _barrier("unite_model_dir_written")
        if primary:
            _move_into_place(tmp, dst)
        _barrier("unite_model_dir_renamed")
    except BaseException:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: str, dst: str) -> None:
    """Renames `tmp` to `dst`, replacing an existing `dst` (moved aside first, then deleted)."""
    if not os.path.lexists(dst):
        os.rename(tmp, dst)
        return
    old = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}{_OLD_SUFFIX}")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(dst, old)
    os.rename(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------- Orbax I/O
def _orbax_path(directory: str) -> str:
    """The path to hand Orbax: absolute (its readers and writers refuse relative paths); URLs as given."""
    return directory if "://" in directory else os.path.abspath(directory)


def _numpy_handler(type_handlers):
    """Orbax's numpy handler without its defensive deep copy where the installed Orbax offers that
    option (recent 0.12 releases; 0.12.4 does not): older ones copy, which costs memory only."""
    try:
        return type_handlers.NumpyHandler(deepcopy_host_arrays=False)
    except TypeError:
        return type_handlers.NumpyHandler()


def _save_tree(directory: str, tree: Mapping[str, Any]) -> None:
    """Writes a pytree of numpy / jax arrays as an Orbax (PyTree, OCDBT) checkpoint at `directory`.

    Numpy leaves are written without Orbax's defensive deep copy and without compression: the save
    is synchronous (nothing mutates them meanwhile) and float weights hardly compress, so the save
    holds one copy of the weights (measured: about 3x with Orbax's defaults). Readable by
    `ocp.StandardCheckpointer().restore` like any Orbax checkpoint.
    """
    import orbax.checkpoint as ocp

    th = ocp.type_handlers
    handlers = [(t, _numpy_handler(th) if t is np.ndarray else th.get_type_handler(t)) for t in th.supported_types()]
    handler = ocp.PyTreeCheckpointHandler(use_compression=False,
                                          type_handler_registry=th.create_type_handler_registry(*handlers))
    # One chunk per leaf (Orbax's default): smaller chunks would let a restore decode piecewise, but
    # tensorstore then copies every chunk while writing (measured: 1.5x the weights instead of 1.0x).
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(_orbax_path(directory), args=ocp.args.PyTreeSave(dict(tree)))


def stored_leaves(directory: str) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
    """{leaf path: (shape, dtype)} of an Orbax checkpoint, from its metadata (no array data read)."""
    import orbax.checkpoint as ocp

    if not os.path.isdir(directory):
        raise ModelDirError(f"{directory}: missing (expected an Orbax checkpoint directory)")
    try:
        metadata = ocp.PyTreeCheckpointer().metadata(_orbax_path(directory))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise ModelDirError(f"{directory}: not a readable Orbax checkpoint ({e})") from e
    item = getattr(metadata, "item_metadata", metadata)
    tree = getattr(item, "tree", item)
    leaves = flatten_tree(tree) if isinstance(tree, Mapping) else {}
    if not leaves or not all(hasattr(m, "shape") and hasattr(m, "dtype") for m in leaves.values()):
        raise ModelDirError(f"{directory}: not a complete Orbax checkpoint (no array metadata; expected the files "
                            f"Orbax writes, e.g. _METADATA and manifest.ocdbt); it holds {_listing(directory)}")
    return {path: (tuple(int(d) for d in m.shape), np.dtype(m.dtype)) for path, m in leaves.items()}


def _restore_leaves(directory: str, paths: Sequence[tuple[str, ...]],
                    stored: Mapping[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]) -> dict:
    """{path: numpy array} for the given leaves only (an Orbax partial restore, in the stored dtype)."""
    import orbax.checkpoint as ocp

    item = _unflatten({p: 0 for p in paths})
    args = _unflatten({p: ocp.RestoreArgs(restore_type=np.ndarray, dtype=stored[p][1]) for p in paths})
    try:
        restored = ocp.PyTreeCheckpointer().restore(
            _orbax_path(directory), args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True))
    except (ValueError, OSError, KeyError) as e:  # tensorstore reports missing / corrupt data as ValueError
        names = ", ".join("/".join(p) for p in paths[:3]) + (" ..." if len(paths) > 3 else "")
        raise ModelDirError(f"{directory}: cannot read {names} ({' '.join(str(e).split())[:300]})") from e
    flat = flatten_tree(restored)
    for p in paths:
        if tuple(flat[p].shape) != stored[p][0]:
            raise ModelDirError(f"{directory}: leaf {'/'.join(p)} restored with shape {list(flat[p].shape)}, "
                                f"its metadata says {list(stored[p][0])}")
    return flat


def _groups(paths: Sequence[tuple[str, ...]], nbytes: Mapping[tuple[str, ...], int],
            budget: int) -> list[list[tuple[str, ...]]]:
    """Consecutive runs of `paths` of at most `budget` bytes each (a larger leaf gets a run of its own)."""
    groups: list[list[tuple[str, ...]]] = [[]]
    size = 0
    for p in paths:
        if groups[-1] and size + nbytes[p] > budget:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += nbytes[p]
    return [g for g in groups if g]


class _LeafReader:
    """Restores a model directory's parameter leaves group by group, LoRA folded in.

    `get(path)` returns a leaf in its stored dtype; the group holding it is restored on demand and
    the previous group dropped, so at most one group is alive here (callers may keep leaves).
    """

    def __init__(self, model_dir: str, cfg: ModelConfig, meta: Mapping[str, Any], group_bytes: int):
        self.params_dir = os.path.join(model_dir, PARAMS_DIR)
        self.stored = stored_leaves(self.params_dir)
        _check_leaves(self.stored, cfg, self.params_dir)
        self.order = list(flatten_tree(param_shapes(cfg)))  # the writer's (name table's) order
        sizes = {p: int(np.prod(self.stored[p][0])) * self.stored[p][1].itemsize for p in self.order}
        self.groups = _groups(self.order, sizes, group_bytes)
        self.group_of = {p: i for i, g in enumerate(self.groups) for p in g}
        self.lora, self.lora_scale = _read_lora(model_dir, meta, self.stored)
        self._current: tuple[int, dict] | None = None

    def get(self, path: tuple[str, ...]) -> np.ndarray:
        index = self.group_of[path]
        if self._current is None or self._current[0] != index:
            self._current = None  # drop the previous group before reading the next
            leaves = _restore_leaves(self.params_dir, self.groups[index], self.stored)
            for p in self.groups[index]:
                if p[-1] == "kernel" and p[:-1] in self.lora:
                    leaves[p] = _merge_lora_leaf(leaves[p], self.lora[p[:-1]], self.lora_scale)
            self._current = (index, leaves)
        return self._current[1][path]

    def dominant_dtype(self) -> np.dtype:
        """The stored dtype holding most bytes."""
        totals: dict[np.dtype, int] = {}
        for shape, dtype in self.stored.values():
            totals[dtype] = totals.get(dtype, 0) + int(np.prod(shape)) * dtype.itemsize
        return max(totals, key=totals.get)

    def close(self) -> None:
        self._current = None


def _check_leaves(stored: Mapping[tuple[str, ...], tuple[tuple[int, ...], np.dtype]], cfg: ModelConfig,
                  where: str) -> None:
    """The checkpoint's leaves must be exactly the config's parameter tree, shape for shape."""
    missing, extra, wrong = tree_mismatches(cfg, {p: shape for p, (shape, _) in stored.items()})
    if missing or extra:
        raise ModelDirError(f"{where}: parameter tree does not match {MODEL_META}'s config: missing "
                            f"{_names(missing)}, unexpected {_names(extra)}")
    if wrong:
        raise ModelDirError(f"{where}: parameter shapes do not match {MODEL_META}'s config:\n  " + "\n  ".join(wrong))
    odd = [f"{'/'.join(p)}: {dtype}" for p, (_, dtype) in stored.items() if dtype.kind not in "fV"]
    if odd:
        raise ModelDirError(f"{where}: parameters must be floating point: {_names(odd)}")


# ---------------------------------------------------------------- LoRA
def _read_lora(model_dir: str, meta: Mapping[str, Any], stored: Mapping) -> tuple[dict, float]:
    """({path of a linear: {"lora_a", "lora_b"}}, alpha / rank) to fold in on load, or ({}, 0.0)."""
    lora_meta = meta.get("lora")
    lora_dir = os.path.join(model_dir, LORA_DIR)
    meta_path = os.path.join(model_dir, MODEL_META)
    present = os.path.isdir(lora_dir)
    if present and lora_meta is None:
        raise ModelDirError(f"{model_dir}: has {LORA_DIR}/ but {meta_path} field 'lora' is null (need rank and "
                            "alpha to merge it)")
    if lora_meta is None or lora_meta["merged"]:
        return {}, 0.0  # no LoRA, or already folded into params/ (a lora/ then is kept for reference only)
    if not present:
        raise ModelDirError(f"{meta_path}: field 'lora.merged' is false but {lora_dir} is missing: the "
                            "unmerged LoRA weights are not there")
    lora_stored = stored_leaves(lora_dir)
    flat = _restore_leaves(lora_dir, list(lora_stored), lora_stored)
    pairs: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
    for path, value in flat.items():
        if path[-1] not in ("lora_a", "lora_b"):
            raise ModelDirError(f"{lora_dir}: leaf {'/'.join(path)} is neither lora_a nor lora_b")
        pairs.setdefault(path[:-1], {})[path[-1]] = value
    shapes = {path: shape for path, (shape, _) in stored.items()}
    for linear, pair in pairs.items():
        _check_lora_pair(linear, pair, shapes, lora_dir, lora_meta["rank"])
    return pairs, float(lora_meta["alpha"]) / int(lora_meta["rank"])


def _check_lora_pair(linear: tuple[str, ...], pair: Mapping[str, Any],
                     kernel_shapes: Mapping[tuple[str, ...], tuple[int, ...]], where: str, rank: int) -> None:
    """lora_a [L, in, r] and lora_b [L, r, out] must fit the kernel [L, in, out] at `linear`."""
    name = "/".join(linear)
    if set(pair) != {"lora_a", "lora_b"}:
        raise ModelDirError(f"{where}: {name} has {sorted(pair)}, expected both lora_a and lora_b")
    kernel = linear + ("kernel",)
    if kernel not in kernel_shapes:
        raise ModelDirError(f"{where}: {name} has LoRA weights but the parameters have no {'/'.join(kernel)}")
    shape = tuple(kernel_shapes[kernel])
    *lead, fan_in, fan_out = shape
    want_a, want_b = (*lead, fan_in, rank), (*lead, rank, fan_out)
    got_a, got_b = tuple(np.shape(pair["lora_a"])), tuple(np.shape(pair["lora_b"]))
    if (got_a, got_b) != (want_a, want_b):
        raise ModelDirError(f"{where}: {name}: lora_a {list(got_a)} / lora_b {list(got_b)} do not fit kernel "
                            f"{list(shape)} at rank {rank}: expected {list(want_a)} / {list(want_b)}")


def _merge_lora_leaf(kernel: np.ndarray, pair: Mapping[str, np.ndarray], scale: float) -> np.ndarray:
    """kernel [L, in, out] + scale * lora_a [L, in, r] @ lora_b [L, r, out], layer by layer, in place.

    Uses `unite_jax.model.lora.merge_lora` (float32 math, cast back to the kernel's dtype) on one
    layer at a time, so the float32 temporaries are one layer, not the whole stacked leaf.
    """
    from unite_jax.model.lora import merge_lora

    out = kernel if kernel.flags.writeable else kernel.copy()
    for layer in range(out.shape[0]):
        merged = merge_lora({"w": {"kernel": out[layer]}},
                            {"w": {"lora_a": np.asarray(pair["lora_a"][layer]),
                                   "lora_b": np.asarray(pair["lora_b"][layer])}}, scale)
        out[layer] = merged["w"]["kernel"]
    return out


# ---------------------------------------------------------------- save / load
def save_model_dir(out_dir: str, params: Params, cfg: ModelConfig, *, assets_from: str | None,
                   lora: Params | None = None, lora_meta: Mapping[str, Any] | None = None, source: str = "",
                   extra: Mapping[str, Any] | None = None, overwrite: bool = False) -> str:
    """Writes an Orbax model directory atomically; returns its absolute path.

    params: the full tree (`unite_jax.model.params` layout; numpy or jax arrays, sharded or not),
        already merged if training used LoRA.
    assets_from: a directory whose tokenizer / pre-processor files (ASSET_FILES) are copied; its
        tokenizer.json must exist and fit `cfg` (`check_tokenizer`). None writes no assets (the
        directory then cannot be encoded with or exported until they are added).
    lora / lora_meta: an unmerged LoRA tree to store in lora/ (then lora_meta needs "rank" and
        "alpha"; "merged" is set to false), or lora=None with lora_meta describing LoRA that is
        already folded into params ("merged" defaults to true).
    source, extra: free text, and JSON-serialisable metadata stored under "extra".
    Multi-process: call it from EVERY process with the same arguments; all take part in the Orbax
    save of sharded arrays, process 0 writes the small files and renames the directory.
    """
    out_dir = os.path.abspath(out_dir)
    _check_tree_against(params, cfg)
    if assets_from is not None:
        check_tokenizer(assets_from, cfg)
    lora_meta = _lora_meta_for_save(lora, lora_meta, params)
    meta = _make_meta(cfg, _dominant_dtype(params).name, lora_meta, source, extra)
    json.dumps(meta)  # fail before writing anything if `extra` is not JSON-serialisable
    sources = [assets_from] if assets_from else []
    with atomic_directory(out_dir, overwrite=overwrite, sources=sources) as tmp:
        _save_tree(os.path.join(tmp, PARAMS_DIR), params)
        if lora is not None:
            _save_tree(os.path.join(tmp, LORA_DIR), lora)
        if jax.process_index() == 0:
            if assets_from is not None:
                copy_assets(assets_from, tmp)
            _write_meta(tmp, meta)  # last: a directory with unite_model.json is complete
    return out_dir


def _write_meta(directory: str, meta: Mapping[str, Any]) -> None:
    with open(os.path.join(directory, MODEL_META), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


def _lora_meta_for_save(lora: Params | None, lora_meta: Mapping[str, Any] | None, params: Params) -> dict | None:
    if lora is None:
        if lora_meta is None:
            return None
        meta = {"merged": True, **dict(lora_meta)}
    else:
        if lora_meta is None or "rank" not in lora_meta or "alpha" not in lora_meta:
            raise ModelDirError("save_model_dir: an unmerged `lora` tree needs lora_meta with 'rank' and 'alpha'")
        leaves = flatten_tree(lora)
        pairs: dict[tuple[str, ...], dict] = {}
        for path, value in leaves.items():
            pairs.setdefault(path[:-1], {})[path[-1]] = value
        shapes = {path: tuple(np.shape(leaf)) for path, leaf in flatten_tree(params).items()}
        for linear, pair in pairs.items():
            _check_lora_pair(linear, pair, shapes, "save_model_dir: lora", int(lora_meta["rank"]))
        targets = sorted({linear[-1] for linear in pairs})
        meta = {"targets": targets, **dict(lora_meta), "merged": False}
    meta.setdefault("targets", [])
    _check_lora_meta(meta, "save_model_dir: lora_meta")
    return meta


def _check_tree_against(params: Params, cfg: ModelConfig) -> None:
    stored = {p: (tuple(int(d) for d in np.shape(v)), np.dtype(v.dtype)) for p, v in flatten_tree(params).items()}
    _check_leaves(stored, cfg, "save_model_dir: params")


def _dominant_dtype(params: Params) -> np.dtype:
    """The dtype holding most bytes of the tree."""
    totals: dict[np.dtype, int] = {}
    for leaf in flatten_tree(params).values():
        dtype = np.dtype(leaf.dtype)
        totals[dtype] = totals.get(dtype, 0) + int(np.prod(np.shape(leaf))) * dtype.itemsize
    return max(totals, key=totals.get)


def load_model_dir(path: str, *, dtype: Any = None, sharding: Any = None,
                   group_bytes: int = RESTORE_GROUP_BYTES) -> tuple[Params, ModelConfig, dict[str, Any]]:
    """(params, cfg, meta) of an Orbax model directory or a finished training workdir.

    params: the full tree with an unmerged lora/ folded in; numpy arrays in the stored dtype, or
        `dtype` if given (cast after the merge). With `sharding` (one `jax.sharding.Sharding` for
        every leaf, or a tree of them mirroring params) the leaves are global jax arrays placed leaf
        by leaf; every process reads the full leaf and keeps only its devices' shards.
    cfg: `ModelConfig.from_hf_dict(meta["config"])` (the architecture).
    Errors name the file and field: missing / corrupt unite_model.json, wrong "format", missing
    params/, a parameter tree that does not match the config.
    """
    model_dir = resolve_model_dir(path)
    meta = read_meta(model_dir)
    cfg = config_from_meta(meta, model_dir)
    reader = _LeafReader(model_dir, cfg, meta, group_bytes)
    target = np.dtype(_numpy_dtype(dtype)) if dtype is not None else None
    shardings = _sharding_lookup(sharding)
    flat: dict[tuple[str, ...], Any] = {}
    for p in reader.order:
        leaf = reader.get(p)
        if target is not None and leaf.dtype != target:
            leaf = leaf.astype(target)
        if shardings is not None:
            host = leaf
            leaf = jax.block_until_ready(
                jax.make_array_from_callback(host.shape, shardings(p), lambda index, host=host: host[index]))
            del host
        flat[p] = leaf
    reader.close()
    return _unflatten(flat), cfg, meta


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


def _numpy_dtype(dtype: Any) -> np.dtype:
    """A numpy dtype from a name ('bfloat16' included) or a dtype object."""
    import jax.numpy as jnp

    try:
        return np.dtype(jnp.dtype(dtype))
    except TypeError as e:
        raise ModelDirError(f"unknown dtype {dtype!r}; expected e.g. 'float32' or 'bfloat16'") from e


# ---------------------------------------------------------------- conversions
def hf_to_model_dir(src: str, dst: str, *, dtype: Any = None, overwrite: bool = False) -> str:
    """Converts a Hugging Face Qwen2-VL / UNITE directory (4.x or 5.x layout) to an Orbax model directory.

    Keeps the checkpoint's dtype unless `dtype` is given; carries the tokenizer and pre-processor
    files; checks that the tokenizer fits the config before reading any weights. Returns `dst`.
    Peak host memory: the weights once (read tensor by tensor into the tree, which Orbax writes
    without a copy).
    """
    from unite_jax.convert.hf import detect_layout, load_hf_params

    _require_hf_dir(src)
    check_destination(dst, overwrite, [src])
    cfg = ModelConfig.from_pretrained(src)
    check_tokenizer(src, cfg)
    checkpoint = st.Checkpoint(src)
    layout = detect_layout(checkpoint.names(), src)
    stored = _checkpoint_dtype(checkpoint)
    out_dtype = _numpy_dtype(dtype) if dtype is not None else stored
    params = load_hf_params(src, cfg, dtype=out_dtype)
    return save_model_dir(dst, params, cfg, assets_from=src, source=f"Hugging Face directory {os.path.abspath(src)}",
                          extra={"converted_from": "huggingface", "hf_layout": layout, "hf_dtype": stored.name},
                          overwrite=overwrite)


def _require_hf_dir(src: str) -> None:
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src}: no such directory")
    if not is_hf_dir(src):
        raise ModelDirError(f"{src}: not a Hugging Face directory (needs {HF_CONFIG} and *.safetensors); "
                            f"it holds {_listing(src)}")


def _checkpoint_dtype(checkpoint: st.Checkpoint) -> np.dtype:
    """The dtype holding most bytes of a safetensors checkpoint."""
    totals: dict[np.dtype, int] = {}
    for name in checkpoint.names():
        info = checkpoint.info(name)
        totals[info.dtype] = totals.get(info.dtype, 0) + info.nbytes
    return max(totals, key=totals.get)


def model_dir_to_hf(src: str, dst: str, *, dtype: Any = None, overwrite: bool = False,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    group_bytes: int = RESTORE_GROUP_BYTES) -> str:
    """Exports an Orbax model directory (or finished training workdir) as a Hugging Face directory.

    Writes, atomically: safetensors shards of at most `max_shard_bytes` (+ index when several;
    transformers 4.x key names, which 4.x and 5.x load), config.json, the tokenizer and pre-processor
    files, and README.md (a model card with the UNITE pooling recipe and the source metadata).
    An unmerged lora/ is folded in. Keeps the stored dtype unless `dtype` is given (cast tensor by
    tensor). Streams: at most one restore group plus one tensor is in host memory. Returns `dst`.
    """
    from unite_jax.convert import hf
    from unite_jax.convert.model_card import model_card

    model_dir = resolve_model_dir(src)
    meta = read_meta(model_dir)
    cfg = config_from_meta(meta, model_dir)
    missing = [name for name in REQUIRED_ASSETS if not os.path.isfile(os.path.join(model_dir, name))]
    if missing:
        raise ModelDirError(f"{model_dir}: no {', '.join(missing)}; exporting needs the model's tokenizer "
                            "(save the model directory with assets_from=...)")
    check_tokenizer(model_dir, cfg)
    check_destination(dst, overwrite, [src, model_dir])
    reader = _LeafReader(model_dir, cfg, meta, group_bytes)
    out_dtype = _numpy_dtype(dtype) if dtype is not None else None
    specs = [_pending_tensor(m, reader, out_dtype or reader.stored[m.path][1]) for m in hf.name_table(cfg, "4.x")]
    config = cfg.to_hf_dict()
    dtype_name = _dominant_spec_dtype(specs).name
    config["dtype"] = dtype_name  # transformers 5.x
    config["torch_dtype"] = dtype_name  # transformers 4.x
    with atomic_directory(dst, overwrite=overwrite, sources=[src, model_dir]) as tmp:
        if jax.process_index() == 0:  # host-side files only: one writer is enough
            st.save_sharded(specs, tmp, max_shard_bytes)
            reader.close()
            st.write_json(os.path.join(tmp, HF_CONFIG), config)
            copy_assets(model_dir, tmp)
            with open(os.path.join(tmp, MODEL_CARD), "w", encoding="utf-8") as f:
                f.write(model_card(cfg, meta, dtype_name=dtype_name))
    return os.path.abspath(dst)


def _pending_tensor(m, reader: _LeafReader, dtype: np.dtype) -> st.PendingTensor:
    """One HF tensor, read from the model directory only when the writer reaches it."""
    from unite_jax.convert.hf import to_hf_layout

    def load() -> np.ndarray:
        leaf = reader.get(m.path)
        part = leaf if m.layer is None else leaf[m.layer]
        return to_hf_layout(m.kind, part.astype(dtype, copy=False), m.hf_shape)

    return st.PendingTensor(m.hf_name, m.hf_shape, np.dtype(dtype), load)


def _dominant_spec_dtype(specs: Sequence[st.PendingTensor]) -> np.dtype:
    totals: dict[np.dtype, int] = {}
    for s in specs:
        totals[s.dtype] = totals.get(s.dtype, 0) + s.nbytes
    return max(totals, key=totals.get)


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
    raise ModelDirError(f"{src}: neither format ({describe_formats()}); it holds {_listing(src)}")


def convert(src: str, dst: str, *, dtype: Any = None, overwrite: bool = False,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> tuple[str, str]:
    """Converts in the direction `src` implies; returns (direction, absolute dst)."""
    direction = conversion_direction(src)
    if direction == "hf_to_orbax":
        return direction, hf_to_model_dir(src, dst, dtype=dtype, overwrite=overwrite)
    return direction, model_dir_to_hf(src, dst, dtype=dtype, overwrite=overwrite, max_shard_bytes=max_shard_bytes)


# ---------------------------------------------------------------- helpers
def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"[{shown}{more}]"


def _listing(directory: str) -> str:
    """The entries of a directory, for error messages (subdirectories end with '/')."""
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        return "nothing readable"
    if not entries:
        return "nothing (empty)"
    return _names([e + "/" if os.path.isdir(os.path.join(directory, e)) else e for e in entries])
