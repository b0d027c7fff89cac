"""Embeddings on disk: a cache keyed by model and inputs, and resumable sharded encoding to one .npy.

Every file is written atomically (`unite_jax.files`), so a crash leaves either the old file or the
new one, never half of one; files that are unreadable anyway (a full disk, a copy cut short) are
detected on load, ignored and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence

import numpy as np

from unite_jax import files
from unite_jax.progress import Progress, log

EncodeFn = Callable[[list], np.ndarray]
# Model-directory files up to this size are hashed by content (configs, tokenizer); larger
# ones (weights) by name, size and modification time, so a 15 GB checkpoint is not read.
CONTENT_HASH_MAX_BYTES = 16 << 20


def run_key(**parts) -> str:
    """Hex SHA-256 of keyword values (JSON-serialisable), independent of argument order."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def model_fingerprint(model_dir: str, **options) -> str:
    """A key for the vectors a model directory gives under `options` (dtype, max_text_tokens, ...).

    Hashes every file below `model_dir` (Hugging Face or Orbax layout): small files by content,
    large ones by relative name, size and mtime.
    """
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model directory {model_dir!r} does not exist")
    digest = hashlib.sha256()
    for root, dirs, names in os.walk(model_dir):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            stat = os.stat(path)
            digest.update(f"{os.path.relpath(path, model_dir)}\0{stat.st_size}\0".encode())
            if stat.st_size <= CONTENT_HASH_MAX_BYTES:
                with open(path, "rb") as f:
                    digest.update(hashlib.sha256(f.read()).digest())
            else:
                digest.update(str(stat.st_mtime_ns).encode())
    return run_key(model=digest.hexdigest(), **options)


# ----------------------------------------------------------------------------- vector files
def load_vectors(path: str, num_rows: int, dim: int | None = None) -> np.ndarray | None:
    """float32 [num_rows, dim] from a .npy file, or None when it is missing, unreadable or wrong."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if (array.dtype != np.float32 or array.ndim != 2 or array.shape[0] != num_rows
            or (dim is not None and array.shape[1] != dim)):
        return None
    array = np.array(array)  # read it all now: a truncated file fails here, not later
    return array if np.isfinite(array).all() else None


# ----------------------------------------------------------------------------- cache
class EmbeddingCache:
    """float32 [N, D] arrays stored as DIR/<key>.npy; `key` must cover everything the vectors depend on."""

    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)

    def path(self, key: str) -> str:
        return os.path.join(self.directory, f"{key}.npy")

    def load(self, key: str, num_rows: int) -> np.ndarray | None:
        """The cached vectors, or None (absent, or corrupted: then it is rewritten on `save`)."""
        path = self.path(key)
        if not os.path.exists(path):
            return None
        vectors = load_vectors(path, num_rows)
        if vectors is None:
            log(f"cache: ignoring unreadable or mismatched {path} (it will be rewritten)")
        return vectors

    def save(self, key: str, vectors: np.ndarray) -> None:
        files.save_npy(self.path(key), np.ascontiguousarray(vectors, np.float32))


# ----------------------------------------------------------------------------- encoding
def encode_in_chunks(encode_fn: EncodeFn, items: Sequence[dict], chunk_size: int | None,
                     progress: Progress | None = None, lines: Sequence[str] | None = None) -> np.ndarray:
    """encode_fn over `items` in pieces of chunk_size (None: one call) -> float32 [N, D], checked.

    lines: optional "FILE:LINE" of each item, named when encode_fn returns a bad row.
    """
    chunk_size = chunk_size or max(len(items), 1)
    pieces, dim = [], None
    for start in range(0, len(items), chunk_size):
        batch = list(items[start:start + chunk_size])
        vectors = check_vectors(encode_fn(batch), len(batch), dim,
                                lines[start:start + chunk_size] if lines is not None else None, start)
        dim = vectors.shape[1]
        pieces.append(vectors)
        if progress is not None:
            progress.update(len(batch))
    return np.concatenate(pieces) if len(pieces) != 1 else pieces[0]


def check_vectors(vectors, num_rows: int, dim: int | None = None, lines: Sequence[str] | None = None,
                  offset: int = 0) -> np.ndarray:
    """encode_fn's output as float32 [num_rows, D]; errors name the item (and its FILE:LINE)."""
    array = np.asarray(vectors)
    if array.ndim != 2 or array.shape[0] != num_rows or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"encode_fn returned {array.dtype} {array.shape} for {num_rows} items; "
                         f"expected float [{num_rows}, dim]")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"encode_fn returned dimension {array.shape[1]}, earlier calls {dim}")
    array = np.ascontiguousarray(array, np.float32)
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        where = f" ({lines[row]})" if lines is not None else ""
        raise ValueError(f"encode_fn returned NaN or infinite values for item {offset + row}{where}")
    return array


def ids_path_for(output_path: str) -> str:
    """X.npy -> X.ids.txt (the ids written next to an embeddings file)."""
    if not output_path.endswith(".npy"):
        raise ValueError(f"output {output_path!r}: expected a file name ending in .npy")
    return output_path[: -len(".npy")] + ".ids.txt"


def encode_to_file(encode_fn: EncodeFn, items: Sequence[dict], ids: Sequence[str], output_path: str, *,
                   key: str, shard_size: int = 10_000, chunk_size: int = 256, max_shards: int | None = None,
                   show_progress: bool = True) -> bool:
    """Encodes `items` into OUTPUT (float32 [N, D], input order) and OUTPUT's ids file, resumably.

    Work is split into shards of `shard_size` items, each saved as OUTPUT.parts/part-NNNNNN.npy next
    to a manifest.json recording `key` (a hash of inputs, model and options), the item count and
    the shard size. A rerun with the same manifest skips every shard that loads back with the right
    shape (logging "skipped"); a different manifest means different work, so old parts are deleted.
    When all shards exist they are assembled into OUTPUT (atomically), the ids are written, and the
    parts are removed. encode_fn(list of items) -> float [n, D] is called on `chunk_size` items at a
    time (the granularity of the progress line). max_shards: stop after encoding that many new
    shards (for time-limited jobs); returns False when it stopped early, True when OUTPUT is complete.
    """
    ids_path = ids_path_for(output_path)
    if len(ids) != len(items):
        raise ValueError(f"{len(ids)} ids for {len(items)} items")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if not items:
        raise ValueError("no items to encode")
    parts_dir = f"{output_path}.parts"
    manifest = {"key": key, "num_items": len(items), "shard_size": shard_size}
    _prepare_parts_dir(parts_dir, manifest)
    bounds = [(start, min(start + shard_size, len(items))) for start in range(0, len(items), shard_size)]
    progress = Progress(len(items), enabled=show_progress)
    dim, encoded_now = None, 0
    for number, (start, stop) in enumerate(bounds):
        part = os.path.join(parts_dir, f"part-{number:06d}.npy")
        existing = load_vectors(part, stop - start, dim) if os.path.exists(part) else None
        if existing is not None:
            dim = existing.shape[1]
            log(f"shard {number} [{start}, {stop}): skipped (finished earlier)")
            progress.skipped(stop - start)
            continue
        if os.path.exists(part):
            log(f"shard {number} [{start}, {stop}): {part} is unreadable, encoding it again")
        if max_shards is not None and encoded_now >= max_shards:
            log(f"stopped after {encoded_now} new shard(s) (--max_shards); rerun to continue")
            return False
        vectors = encode_in_chunks(encode_fn, items[start:stop], chunk_size, progress)
        if dim is not None and vectors.shape[1] != dim:
            raise ValueError(f"shard {number}: dimension {vectors.shape[1]}, earlier shards {dim}")
        dim = vectors.shape[1]
        _save_part(parts_dir, manifest, part, vectors)
        encoded_now += 1
    _assemble(parts_dir, bounds, len(items), dim, output_path)
    files.write_text(ids_path, "".join(f"{i}\n" for i in ids))
    _remove_parts(parts_dir)
    return True


def _prepare_parts_dir(parts_dir: str, manifest: dict) -> None:
    """Clears the parts directory when it belongs to a different run (nothing is created here:
    a run that fails before its first shard, e.g. on a bad model directory, leaves no trace)."""
    if not os.path.isdir(parts_dir):
        return
    try:
        with open(os.path.join(parts_dir, "manifest.json"), encoding="utf-8") as f:
            previous = json.load(f)
    except (OSError, ValueError):
        previous = None
    if previous != manifest:
        log(f"{parts_dir}: parts of a different run (input, model or options changed): starting over")
        _remove_parts(parts_dir)


def _save_part(parts_dir: str, manifest: dict, path: str, vectors: np.ndarray) -> None:
    """Saves one shard, creating the parts directory and its manifest first when needed."""
    manifest_path = os.path.join(parts_dir, "manifest.json")
    if not os.path.exists(manifest_path):
        os.makedirs(parts_dir, exist_ok=True)
        files.write_text(manifest_path, json.dumps(manifest, indent=1))
    files.save_npy(path, vectors)


def _assemble(parts_dir: str, bounds: list[tuple[int, int]], num_items: int, dim: int, output_path: str) -> None:
    """Copies the shards into one .npy written through a memory map, then renames it into place."""
    with files.atomic_path(output_path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(num_items, dim))
        for number, (start, stop) in enumerate(bounds):
            out[start:stop] = np.load(os.path.join(parts_dir, f"part-{number:06d}.npy"))
        out.flush()
        del out


def _remove_parts(parts_dir: str) -> None:
    """Deletes the files this module writes in a parts directory (never anything else), then the
    directory itself if it is empty."""
    for name in os.listdir(parts_dir):
        if name == "manifest.json" or (name.startswith("part-") and ".npy" in name) or files.is_temporary(name):
            os.remove(os.path.join(parts_dir, name))
    if not os.listdir(parts_dir):
        os.rmdir(parts_dir)
