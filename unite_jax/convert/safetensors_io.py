"""A small safetensors reader and writer on numpy (no torch).

File format: an 8-byte little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`),
then the tensors' bytes, little-endian and row-major, with offsets relative to
the end of the header. Offsets must tile the data region without gaps.

Reading is lazy: headers are parsed up front, each tensor is mapped from disk
only when asked for (`np.memmap`), so a multi-GB checkpoint is never held in
memory twice. Writing streams: the header is computed from shapes and dtypes
alone, then each tensor is materialised, written and dropped in turn. Every
file is written atomically (`unite_jax.files`), so an interrupted write never
leaves a half-written checkpoint behind.

Sharded checkpoints follow transformers' naming:
`model-00001-of-00003.safetensors` plus `model.safetensors.index.json` with
`{"metadata": {"total_size": bytes}, "weight_map": {name: file}}`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from typing import Any, Callable, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

from unite_jax import files

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
_HEADER_ALIGN = 8  # the safetensors package pads the header so the data starts 8-byte aligned
_MAX_HEADER_BYTES = 100 * 2**20  # a larger header means a corrupt length field, not a real checkpoint

# safetensors dtype code -> numpy dtype (explicitly little-endian where byte order matters).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype(np.bool_),
}
_CODES: dict[np.dtype, str] = {dtype: code for code, dtype in DTYPES.items()}


class SafetensorsError(ValueError):
    """A safetensors file or sharded checkpoint is malformed; the message names the file."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: `path`, byte range [begin, end) measured from the file start."""

    name: str
    path: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def dtype_code(dtype: Any) -> str:
    """The safetensors code of a numpy dtype (`float32` -> "F32", `bfloat16` -> "BF16")."""
    dtype = np.dtype(dtype)
    if dtype not in _CODES:  # also rejects big-endian dtypes: the format is little-endian
        raise SafetensorsError(f"dtype {dtype} cannot be stored in safetensors; known: {sorted(DTYPES)}")
    return _CODES[dtype]


# ------------------------------------------------------------------------ reading
def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parses a file's header: ({name: TensorInfo}, metadata). Reads only the header bytes."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such safetensors file")
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise SafetensorsError(f"{path}: truncated file ({file_size} bytes, shorter than the 8-byte header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > file_size - 8 or header_len > _MAX_HEADER_BYTES:
            raise SafetensorsError(
                f"{path}: header length {header_len} is beyond the file size ({file_size} bytes): "
                "truncated or not a safetensors file")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is a JSON {type(header).__name__}, expected an object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors = {name: _tensor_info(path, name, entry, data_start, file_size) for name, entry in header.items()}
    return tensors, dict(metadata)


def _tensor_info(path: str, name: str, entry: Any, data_start: int, file_size: int) -> TensorInfo:
    """Validates one header entry against its dtype, shape and the file size."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise SafetensorsError(f"{path}: tensor {name!r}: header entry must have dtype, shape and data_offsets")
    code = entry["dtype"]
    if code not in DTYPES:
        raise SafetensorsError(f"{path}: tensor {name!r}: unknown dtype {code!r}; known: {sorted(DTYPES)}")
    dtype = DTYPES[code]
    shape = tuple(int(d) for d in entry["shape"])
    begin, end = (int(x) for x in entry["data_offsets"])
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected or begin < 0:
        raise SafetensorsError(
            f"{path}: tensor {name!r}: data_offsets [{begin}, {end}] hold {end - begin} bytes, "
            f"but {code}{list(shape)} needs {expected}")
    if data_start + end > file_size:
        raise SafetensorsError(
            f"{path}: truncated file: tensor {name!r} ends at byte {data_start + end} "
            f"but the file has {file_size} bytes")
    return TensorInfo(name, path, dtype, shape, data_start + begin, data_start + end)


def read_tensor(info: TensorInfo, copy: bool = False) -> np.ndarray:
    """The tensor's values [*info.shape]: a read-only memory map of the file, or an owned copy."""
    if info.nbytes == 0:  # mmap cannot map zero bytes
        return np.zeros(info.shape, info.dtype)
    array = np.memmap(info.path, dtype=info.dtype, mode="r", offset=info.begin, shape=info.shape)
    return np.array(array) if copy else array


def load_file(path: str) -> dict[str, np.ndarray]:
    """All tensors of one file as owned numpy arrays (small files; use `Checkpoint` for large ones)."""
    tensors, _ = read_header(path)
    return {name: read_tensor(info, copy=True) for name, info in tensors.items()}


class Checkpoint:
    """The tensors of a checkpoint directory: sharded (index + shards), one `model.safetensors`,
    or, failing those, every `*.safetensors` file in it. Headers only until a tensor is read."""

    def __init__(self, directory: str):
        self.directory = directory
        self.files = checkpoint_files(directory)
        self.tensors: dict[str, TensorInfo] = {}
        index = _read_index(directory) if os.path.isfile(os.path.join(directory, INDEX_FILE)) else None
        for path in self.files:
            tensors, _ = read_header(path)
            for name, info in tensors.items():
                if name in self.tensors:
                    raise SafetensorsError(
                        f"{path}: tensor {name!r} is also stored in {self.tensors[name].path}")
                self.tensors[name] = info
        if index is not None:
            _check_index(directory, index, self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def read(self, name: str, copy: bool = False) -> np.ndarray:
        return read_tensor(self.tensors[name], copy=copy)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, memory-mapped array) in file order, one tensor mapped at a time."""
        for info in sorted(self.tensors.values(), key=lambda t: (t.path, t.begin)):
            yield info.name, read_tensor(info)


def checkpoint_files(directory: str) -> list[str]:
    """The safetensors files of a checkpoint directory, shards in index order."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such checkpoint directory")
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index_path):
        index = _read_index(directory)
        files = list(dict.fromkeys(index["weight_map"].values()))
        paths = [os.path.join(directory, f) for f in files]
        missing = [f for f, p in zip(files, paths) if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{index_path}: shards listed in weight_map are missing: {missing}")
        return paths
    single = os.path.join(directory, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    found = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not found:
        raise FileNotFoundError(f"{directory}: no {SINGLE_FILE}, {INDEX_FILE} or other *.safetensors file")
    return [os.path.join(directory, f) for f in found]


def _read_index(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, INDEX_FILE)
    try:
        with open(path) as f:
            index = json.load(f)
    except json.JSONDecodeError as e:
        raise SafetensorsError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from e
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise SafetensorsError(f"{path}: field 'weight_map' (an object name -> shard file) is missing")
    return index


def _check_index(directory: str, index: Mapping[str, Any], tensors: Mapping[str, TensorInfo]) -> None:
    """Every tensor the index names must be in the shard the index names."""
    index_path = os.path.join(directory, INDEX_FILE)
    for name, file in index["weight_map"].items():
        info = tensors.get(name)
        if info is None or os.path.basename(info.path) != file:
            raise SafetensorsError(f"{index_path}: weight_map puts {name!r} in {file}, but that shard lacks it")


# ------------------------------------------------------------------------ writing
@dataclasses.dataclass(frozen=True)
class PendingTensor:
    """A tensor to write, known by shape and dtype before its values exist.

    `load()` returns the values [*shape]; it is called once, when the writer
    reaches this tensor, so only one tensor is materialised at a time.
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    load: Callable[[], Any]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def pending(name: str, array: Any) -> PendingTensor:
    """Wraps anything with `.shape`/`.dtype` (numpy or jax array) as a PendingTensor."""
    return PendingTensor(name, tuple(int(d) for d in array.shape), np.dtype(array.dtype), lambda: array)


def _as_pending(tensors: Mapping[str, Any] | Iterable[PendingTensor]) -> list[PendingTensor]:
    items = [pending(k, v) for k, v in tensors.items()] if isinstance(tensors, Mapping) else list(tensors)
    seen: set[str] = set()
    for t in items:
        if t.name in seen:
            raise SafetensorsError(f"tensor name {t.name!r} appears twice")
        seen.add(t.name)
    return items


def _header_bytes(tensors: list[PendingTensor], metadata: Mapping[str, str] | None) -> bytes:
    """The JSON header for tensors laid out back to back in the given order, space-padded to 8 bytes."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": dtype_code(t.dtype), "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-len(raw) % _HEADER_ALIGN)


def _tensor_bytes(t: PendingTensor) -> np.ndarray:
    """The tensor's values as a flat uint8 array in C order, after checking shape and dtype."""
    values = np.asarray(t.load())
    if tuple(values.shape) != t.shape or values.dtype != t.dtype:
        raise SafetensorsError(
            f"tensor {t.name!r}: announced {t.dtype}{list(t.shape)}, got {values.dtype}{list(values.shape)}")
    return np.ascontiguousarray(values).reshape(-1).view(np.uint8)


def save_file(tensors: Mapping[str, Any] | Iterable[PendingTensor], path: str,
              metadata: Mapping[str, str] | None = None) -> int:
    """Writes one safetensors file atomically; returns the data size in bytes.

    `tensors` is a mapping name -> array (numpy or jax) or a sequence of
    PendingTensor; the metadata defaults to {"format": "pt"}, which transformers
    requires to load the file.
    """
    items = _as_pending(tensors)
    header = _header_bytes(items, {"format": "pt"} if metadata is None else metadata)
    with files.atomic_file(path) as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for t in items:
            f.write(memoryview(_tensor_bytes(t)))
    return sum(t.nbytes for t in items)


def plan_shards(tensors: list[PendingTensor], max_shard_bytes: int) -> list[list[PendingTensor]]:
    """Groups tensors, in order, into shards of at most max_shard_bytes each.

    A tensor larger than the limit gets a shard of its own (it cannot be split).
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[list[PendingTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_name(i: int, n: int) -> str:
    """transformers' shard file name, 0-based i of n: model-00001-of-00003.safetensors."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


_OUR_FILE_NAMES = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")


def save_sharded(tensors: Mapping[str, Any] | Iterable[PendingTensor], directory: str,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 metadata: Mapping[str, str] | None = None) -> list[str]:
    """Writes a checkpoint directory as transformers does; returns the file names written.

    One shard -> `model.safetensors` and no index; several -> numbered shards plus
    `model.safetensors.index.json`, written last so a reader never sees an index
    whose shards are incomplete. Weight files of an earlier save in the same
    directory that this save does not overwrite are removed, because a stale
    `model.safetensors` would shadow a new index (or the other way round).
    """
    items = _as_pending(tensors)
    os.makedirs(directory, exist_ok=True)
    shards = plan_shards(items, max_shard_bytes)
    names = [SINGLE_FILE] if len(shards) == 1 else [shard_name(i, len(shards)) for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(directory, name), metadata)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in items)},
                 "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard}}
        files.write_json(os.path.join(directory, INDEX_FILE), index, sort_keys=True)
        names.append(INDEX_FILE)
    for stale in os.listdir(directory):
        if _OUR_FILE_NAMES.fullmatch(stale) and stale not in names:
            os.remove(os.path.join(directory, stale))
    return names
