"""Where activations live on the device mesh, as seen by the model code.

The model functions stay pure `f(params, inputs, cfg)` and know nothing about
devices. A caller that jits them over a mesh (the trainer, the ahead-of-time
checker) enters `activation_mesh(mesh)` while the function is traced; inside,
`constrain_batch` pins the leading (batch) axis of a layer's carry to the
mesh's batch axes. Without the pin, XLA's propagation under FSDP is free to
all-gather the activations over the batch instead of gathering the weights,
and every chip then holds global-batch-shaped buffers.

The context only matters at trace time: a jitted function traced inside it
keeps its constraints; outside any context (CPU tests, inference) the helpers
do nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Callable, Iterator, Optional

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# The axes the batch is split over (data parallel, then FSDP), in this order: batch shard
# b = data_index * fsdp_size + fsdp_index. unite_jax.parallel builds meshes with these names.
BATCH_AXES = ("data", "fsdp")
# Tensor parallelism over attention heads / MLP width.
TENSOR_AXIS = "tensor"

_MESH: contextvars.ContextVar[Optional[Mesh]] = contextvars.ContextVar("unite_jax_activation_mesh", default=None)


@contextlib.contextmanager
def activation_mesh(mesh: Optional[Mesh]) -> Iterator[None]:
    """Within this context, traced model code pins activations to `mesh`'s batch axes (None: no pins)."""
    token = _MESH.set(mesh)
    try:
        yield
    finally:
        _MESH.reset(token)


def traced_on(mesh: Optional[Mesh], fn: Callable) -> Callable:
    """`fn` that runs (and so is traced, under jax.jit) inside `activation_mesh(mesh)`; same signature."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with activation_mesh(mesh):
            return fn(*args, **kwargs)

    return wrapped


def current_mesh() -> Optional[Mesh]:
    """The mesh of the enclosing `activation_mesh`, or None."""
    return _MESH.get()


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh's batch axes that have more than one device (the others split nothing)."""
    return tuple(a for a in BATCH_AXES if int(dict(mesh.shape).get(a, 1)) > 1)


def mesh_platform(mesh: Optional[Mesh]) -> str:
    """"tpu", "gpu" or "cpu": the platform `mesh` compiles for (the default backend without a mesh).

    A mesh over compile-only TPU devices (ahead-of-time compilation on a CPU host) says "tpu".
    """
    if mesh is None:
        return jax.default_backend()
    platform = mesh.devices.flat[0].platform
    return "gpu" if platform in ("cuda", "rocm") else platform


def constrain_batch(x: jax.Array, batch_dim: int = 0) -> jax.Array:
    """x with dimension `batch_dim` sharded over the current mesh's batch axes (others replicated).

    A no-op outside `activation_mesh`, on a mesh without batch parallelism, or when the dimension does
    not split evenly (e.g. an inference batch smaller than the device count).
    """
    mesh = current_mesh()
    if mesh is None:
        return x
    axes = batch_axes(mesh)
    shards = math.prod(int(dict(mesh.shape)[a]) for a in axes)
    if not axes or x.shape[batch_dim] % shards:
        return x
    spec = [None] * x.ndim
    spec[batch_dim] = axes if len(axes) > 1 else axes[0]
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))
