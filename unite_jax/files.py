"""Writing files and directories atomically, and telling local paths from remote ones.

A file is written under a temporary name in its own directory (`.NAME.tmp-PID`), flushed and
fsync-ed, then renamed over NAME: a crash leaves the old file or the new one, never half of one,
and a renamed file's bytes are on disk. A directory is built under `.NAME.unite-tmp` and renamed
to NAME when complete (an existing NAME is moved aside first and deleted after).

A leaf module (it imports nothing from the package): the jax-free data layer, the evaluation
and the converters all write through it. Multi-process callers pass their own process rank and
barrier to `atomic_directory`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

_TMP_MARK = ".tmp-"
_DIR_TMP_SUFFIX = ".unite-tmp"
_DIR_OLD_SUFFIX = ".unite-old"


def is_remote(path: str) -> bool:
    """True for a URL (gs://..., s3://...): written through etils.epath, not the local file system."""
    return "://" in str(path)


def absolute(path: str) -> str:
    """An absolute local path (Orbax refuses relative ones); a URL as given."""
    return path if is_remote(path) else os.path.abspath(path)


def temporary_name(path: str) -> str:
    """The sibling temporary file `atomic_path` writes `path` through."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}{_TMP_MARK}{os.getpid()}")


def is_temporary(name: str) -> bool:
    """Whether a file name is one of this module's temporary files (left behind only by a killed process)."""
    return name.startswith(".") and _TMP_MARK in name


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path to write `path` through; on success it is fsync-ed and renamed over `path`.

    On an exception the temporary file is removed and `path` is left as it was.
    """
    tmp = temporary_name(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[BinaryIO]:
    """Yields a binary file object; on success its bytes replace `path` atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            yield f


def write_bytes(path: str, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj: Any, *, indent: int = 2, sort_keys: bool = False) -> None:
    """A JSON file (indented, trailing newline), written atomically."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def save_npy(path: str, array) -> None:
    """numpy.save, atomically."""
    import numpy as np

    with atomic_file(path) as f:
        np.save(f, array)


def _directory_sibling(dst: str, suffix: str) -> str:
    parent, name = os.path.split(os.path.abspath(dst))
    return os.path.join(parent, f".{name}{suffix}")


@contextlib.contextmanager
def atomic_directory(dst: str, *, primary: bool = True,
                     barrier: Callable[[str], None] | None = None) -> Iterator[str]:
    """Yields a fresh temporary directory next to `dst`; on success renames it to `dst`.

    On an exception the temporary directory is removed and `dst` is left as it was. An existing `dst`
    is replaced: moved aside, the new one renamed in, the old one deleted. Several processes: every
    process enters and leaves together, `barrier(name)` synchronising them; the `primary` one creates,
    renames and deletes, the others only write into the directory (on a shared file system). A process
    that fails leaves the others waiting at the barrier, as any collective would.
    """
    dst = os.path.abspath(dst)
    tmp = _directory_sibling(dst, _DIR_TMP_SUFFIX)
    sync = barrier or (lambda name: None)
    if primary:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed earlier attempt
        os.makedirs(tmp)
    sync("unite_atomic_directory_created")
    try:
        yield tmp
        sync("unite_atomic_directory_written")
        if primary:
            _move_into_place(tmp, dst)
        sync("unite_atomic_directory_renamed")
    except BaseException:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: str, dst: str) -> None:
    """Renames `tmp` to `dst`, replacing an existing `dst` (moved aside first, then deleted)."""
    if not os.path.lexists(dst):
        os.rename(tmp, dst)
        return
    old = _directory_sibling(dst, _DIR_OLD_SUFFIX)
    shutil.rmtree(old, ignore_errors=True)
    os.rename(dst, old)
    os.rename(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)
