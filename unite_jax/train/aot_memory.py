"""Per-chip HBM figures from the TPU compiler, with or without code generation.

A full TPU compile of a 2B train step spends almost all of its minutes in code
generation, after XLA has already assigned every buffer. The compiler checks
its buffer assignment against the chip's HBM before generating code, and its
out-of-memory error names the total it needs:

    RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for
    HLO temporaries (768.09M) exceeds available HBM (15.75G).

The "temporaries" of that message are the whole program (arguments + outputs
+ temporaries). So the fast path compiles with the HBM limit lowered to 1 MiB
(`xla_tpu_max_hbm_size_mib`): the compile stops right after buffer assignment,
and the message gives the total. Because the compiler rematerialises to fit
when a program is over its limit, remat of small buffers is switched off for
that compile (`xla_tpu_rematerialization_min_size_in_bytes`), so the figure is
the program's own assignment, not a squeezed one. The same kind of message,
for a program that is too big, gives a chip's available HBM.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

# Stop after buffer assignment: any real program exceeds 1 MiB.
FAST_OPTIONS = {"xla_tpu_max_hbm_size_mib": 1, "xla_tpu_rematerialization_min_size_in_bytes": 2**62}
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_REQUIRED = re.compile(r"total memory required for [^(]*\(([\d.]+)([KMGT]?)\)")
_AVAILABLE = re.compile(r"exceeds available HBM \(([\d.]+)([KMGT]?)\)")


def is_out_of_memory(error: BaseException) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) and _REQUIRED.search(str(error)) is not None


def _size(match: re.Match) -> int:
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def required_bytes(error: BaseException) -> int:
    """The total the compiler needed, from its out-of-memory message (2 significant decimals of a unit)."""
    match = _REQUIRED.search(str(error))
    if match is None:
        raise ValueError(f"not a TPU out-of-memory message: {str(error)[:300]}")
    return _size(match)


def available_bytes(error: BaseException) -> int:
    match = _AVAILABLE.search(str(error))
    if match is None:
        raise ValueError(f"not a TPU out-of-memory message: {str(error)[:300]}")
    return _size(match)


def buffer_assignment_total(lowered) -> int:
    """Per-chip bytes of a lowered TPU program (arguments, outputs, temporaries), without code generation."""
    try:
        lowered.compile(compiler_options=FAST_OPTIONS)
    except Exception as e:  # noqa: BLE001 - the expected outcome is the compiler's out-of-memory error
        if is_out_of_memory(e):
            return required_bytes(e)
        raise
    raise RuntimeError("the program compiled within 1 MiB of HBM; its memory cannot be read from the limit check")


@functools.lru_cache(maxsize=None)
def _capacity(device_kind: str, devices: tuple) -> int:
    from jax.sharding import Mesh

    mesh = Mesh(list(devices), ("x",))
    too_big = jax.jit(lambda: jnp.zeros((2**38,), jnp.float32), out_shardings=NamedSharding(mesh, PartitionSpec()))
    try:
        too_big.lower().compile()
    except Exception as e:  # noqa: BLE001
        return available_bytes(e)
    raise RuntimeError(f"{device_kind}: a 1 TiB buffer compiled; cannot read the chip's HBM capacity")


def hbm_capacity(mesh) -> int:
    """A chip's HBM available to programs, as the TPU compiler counts it (15.75 GiB on v5e)."""
    device = mesh.devices.flat[0]
    return _capacity(device.device_kind, (device,))
