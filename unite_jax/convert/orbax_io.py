"""Parameter trees in Orbax checkpoints: written without extra copies, read back in groups of leaves.

Saving hands Orbax the caller's host arrays without the defensive copy Orbax makes by default and
without compression, so a save holds one copy of the weights (the caller's) plus Orbax's buffers
of small metadata; the checkpointer is synchronous, so nobody mutates the arrays while they are
written. Reading restores groups of leaves (at most `RESTORE_GROUP_BYTES` each, or one leaf when a
leaf is larger), so loading peaks at the tree plus one group, and exporting to Hugging Face never
holds more than one group plus one tensor: the HF writer asks for tensors in the order the groups
are read.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from unite_jax import files
from unite_jax.convert.hf import listing, tree_mismatches
from unite_jax.model.config import ModelConfig
from unite_jax.model.params import flatten_tree, param_shapes, unflatten_tree

# Leaves restored per Orbax call when loading or exporting. Restoring a leaf briefly holds it twice
# (tensorstore decodes its single chunk into a fresh array), so export peaks near
# max(2 x largest leaf, group); 256 MiB keeps the group below the large leaves of real models.
RESTORE_GROUP_BYTES = 256 << 20
Stored = Mapping[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]  # leaf path -> (shape, dtype)


class ModelDirError(ValueError):
    """A model directory (or a conversion source / destination) is wrong; the message names the file and field."""


def _numpy_handler(type_handlers):
    """Orbax's numpy handler without its defensive deep copy where the installed Orbax offers that
    option (recent 0.12 releases; 0.12.4 does not): older ones copy, which costs memory only."""
    try:
        return type_handlers.NumpyHandler(deepcopy_host_arrays=False)
    except TypeError:
        return type_handlers.NumpyHandler()


def save_tree(directory: str, tree: Mapping[str, Any]) -> None:
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
        checkpointer.save(files.absolute(directory), args=ocp.args.PyTreeSave(dict(tree)))


def stored_leaves(directory: str) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
    """{leaf path: (shape, dtype)} of an Orbax checkpoint, from its metadata (no array data read)."""
    import orbax.checkpoint as ocp

    if not os.path.isdir(directory):
        raise ModelDirError(f"{directory}: missing (expected an Orbax checkpoint directory)")
    try:
        metadata = ocp.PyTreeCheckpointer().metadata(files.absolute(directory))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise ModelDirError(f"{directory}: not a readable Orbax checkpoint ({e})") from e
    item = getattr(metadata, "item_metadata", metadata)
    tree = getattr(item, "tree", item)
    leaves = flatten_tree(tree) if isinstance(tree, Mapping) else {}
    if not leaves or not all(hasattr(m, "shape") and hasattr(m, "dtype") for m in leaves.values()):
        raise ModelDirError(f"{directory}: not a complete Orbax checkpoint (no array metadata; expected the files "
                            "Orbax writes, e.g. _METADATA and manifest.ocdbt); it holds "
                            f"{directory_listing(directory)}")
    return {path: (tuple(int(d) for d in m.shape), np.dtype(m.dtype)) for path, m in leaves.items()}


def restore_leaves(directory: str, paths: Sequence[tuple[str, ...]], stored: Stored) -> dict:
    """{path: numpy array} for the given leaves only (an Orbax partial restore, in the stored dtype)."""
    import orbax.checkpoint as ocp

    item = unflatten_tree({p: 0 for p in paths})
    args = unflatten_tree({p: ocp.RestoreArgs(restore_type=np.ndarray, dtype=stored[p][1]) for p in paths})
    try:
        restored = ocp.PyTreeCheckpointer().restore(
            files.absolute(directory),
            args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True))
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


class LeafReader:
    """Restores the parameter leaves of an Orbax checkpoint group by group, checked against `cfg`.

    `get(path)` returns a leaf in its stored dtype; the group holding it is restored on demand and
    the previous group dropped, so at most one group is alive here (callers may keep leaves).
    `order` is the parameter tree's order (the HF writer's order), which the groups follow.
    """

    def __init__(self, params_dir: str, cfg: ModelConfig, where: str, group_bytes: int = RESTORE_GROUP_BYTES):
        self.params_dir = params_dir
        self.stored = stored_leaves(params_dir)
        check_leaves(self.stored, cfg, params_dir, where)
        self.order = list(flatten_tree(param_shapes(cfg)))
        sizes = {p: int(np.prod(self.stored[p][0])) * self.stored[p][1].itemsize for p in self.order}
        self.groups = _groups(self.order, sizes, group_bytes)
        self.group_of = {p: i for i, g in enumerate(self.groups) for p in g}
        self._current: tuple[int, dict] | None = None

    def get(self, path: tuple[str, ...]) -> np.ndarray:
        index = self.group_of[path]
        if self._current is None or self._current[0] != index:
            self._current = None  # drop the previous group before reading the next
            self._current = (index, restore_leaves(self.params_dir, self.groups[index], self.stored))
        return self._current[1][path]

    def close(self) -> None:
        self._current = None


def check_leaves(stored: Stored, cfg: ModelConfig, where: str, config_name: str) -> None:
    """The leaves must be exactly the config's parameter tree, shape for shape, in floating dtypes.

    where: the checkpoint (named in errors); config_name: where the config comes from (named too).
    """
    missing, extra, wrong = tree_mismatches(cfg, {p: shape for p, (shape, _) in stored.items()})
    if missing or extra:
        raise ModelDirError(f"{where}: parameter tree does not match {config_name}'s config: missing "
                            f"{listing(missing, 12)}, unexpected {listing(extra, 12)}")
    if wrong:
        raise ModelDirError(f"{where}: parameter shapes do not match {config_name}'s config:\n  " + "\n  ".join(wrong))
    odd = [f"{'/'.join(p)}: {dtype}" for p, (_, dtype) in stored.items() if dtype.kind not in "fV"]
    if odd:
        raise ModelDirError(f"{where}: parameters must be floating point: {listing(odd, 12)}")


def directory_listing(directory: str) -> str:
    """The entries of a directory, for error messages (subdirectories end with '/')."""
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        return "nothing readable"
    if not entries:
        return "nothing (empty)"
    return listing([e + "/" if os.path.isdir(os.path.join(directory, e)) else e for e in entries], 12)
