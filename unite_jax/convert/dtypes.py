"""Dtypes of stored weights: names to numpy dtypes, and the dtype a mixed set of tensors is "in"."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np


def numpy_dtype(dtype: Any) -> np.dtype:
    """A numpy dtype from a name ('bfloat16' included) or a dtype object; ValueError names an unknown one."""
    import jax.numpy as jnp  # its dtype names cover the ml_dtypes floats

    try:
        return np.dtype(jnp.dtype(dtype))
    except TypeError as e:
        raise ValueError(f"unknown dtype {dtype!r}; expected e.g. 'float32' or 'bfloat16'") from e


def dominant_dtype(sizes: Iterable[tuple[Any, int]]) -> np.dtype:
    """The dtype holding most bytes among (dtype, nbytes) pairs (a model stored in one dtype: that one)."""
    totals: dict[np.dtype, int] = {}
    for dtype, nbytes in sizes:
        dtype = np.dtype(dtype)
        totals[dtype] = totals.get(dtype, 0) + int(nbytes)
    if not totals:
        raise ValueError("dominant_dtype: no tensors")
    return max(totals, key=totals.get)
