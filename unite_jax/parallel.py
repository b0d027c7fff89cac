"""Device mesh, parameter partition rules, and host -> global batch arrays.

Mesh
----
Three named axes, `MESH_AXES = ("data", "fsdp", "tensor")`:
- `data`:   pure data parallelism (parameters replicated across it);
- `fsdp`:   data parallelism whose members also split every large parameter
            (and its optimizer state) on one dimension (ZeRO-3 style; XLA
            all-gathers the weights inside the jitted step);
- `tensor`: tensor parallelism over attention heads / MLP width.
The batch is split over `BATCH_AXES = ("data", "fsdp")`: batch shard
`b = data_index * fsdp_size + fsdp_index` holds rows `b*R .. (b+1)*R - 1`.

Device order. `make_mesh` asks JAX for a topology-aware layout
(`jax.make_mesh`, or `mesh_utils.create_hybrid_device_mesh` when devices span
several TPU slices, with the slices on `data`). With several processes, each
process must own a contiguous block of batch shards, so that it can feed a
contiguous slice of the global batch from its own data; when the
topology-aware layout breaks that, the mesh falls back to devices sorted by
(process, id), which always satisfies it for the usual shapes.

Partition rules
---------------
`PARTITION_RULES` is a table of (regex on the "/"-joined parameter path,
PartitionSpec). The first rule whose regex `re.search`-es the path gives the
tensor-parallel split; a rule's spec names the TRAILING dimensions of the
array (it is left-padded with None), so one rule covers a stacked
[layers, in, out] kernel and an unstacked [in, out] one, and the stacked
layer axis is never sharded. Then FSDP shards the largest remaining
dimension divisible by the `fsdp` axis size (see `partition_spec`). Axes
that do not divide a dimension are dropped for that dimension (never an
error), and mesh axes of size 1 are left out of the specs.

The rules also match optimizer-state trees (optax states embed the parameter
paths, e.g. ".../mu/model/layers/self_attn/q_proj/kernel"), so
`param_shardings(abstract_opt_state, mesh)` shards Adam moments like their
parameters.

Placement and multi-process
---------------------------
`put` / `place_tree` are the one way host values (weights, the same on every
process) become placed arrays; `host_to_global` turns each process's own slice
of a batch into one global `jax.Array`; `to_host` and `barrier` are the other
cross-process helpers. `maybe_initialize_distributed` starts `jax.distributed`
when asked or when the environment shows a multi-process launch.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from unite_jax.model.sharding import BATCH_AXES, TENSOR_AXIS

# The batch axes ("data", "fsdp") are named where the model pins activations to them (model/sharding.py).
MESH_AXES = (*BATCH_AXES, TENSOR_AXIS)

# Column-parallel linears: output features split over `tensor` (attention heads, MLP width).
_COLUMN_PARALLEL = r"(q_proj|k_proj|v_proj|gate_proj|up_proj|attn/qkv|mlp/fc1|merger/mlp/0)"
# Row-parallel linears: input features split over `tensor`; XLA sums the partial products.
_ROW_PARALLEL = r"(o_proj|down_proj|attn/proj|mlp/fc2|merger/mlp/2)"

PARTITION_RULES: tuple[tuple[str, PartitionSpec], ...] = (
    # kernel [..., in, out]; bias [..., out]
    (rf"(^|/){_COLUMN_PARALLEL}/kernel$", PartitionSpec(None, "tensor")),
    (rf"(^|/){_COLUMN_PARALLEL}/bias$", PartitionSpec("tensor")),
    # LoRA of a column-parallel linear: A [..., in, r] replicated, B [..., r, out] split like the kernel's out.
    (rf"(^|/){_COLUMN_PARALLEL}/lora_a$", PartitionSpec(None, None)),
    (rf"(^|/){_COLUMN_PARALLEL}/lora_b$", PartitionSpec(None, "tensor")),
    # Row-parallel kernel [..., in, out]: in on tensor. Its bias is added after the sum: replicated.
    (rf"(^|/){_ROW_PARALLEL}/kernel$", PartitionSpec("tensor", None)),
    # LoRA of a row-parallel linear: A [..., in, r] split like the kernel's in, B [..., r, out] replicated.
    (rf"(^|/){_ROW_PARALLEL}/lora_a$", PartitionSpec("tensor", None)),
    (rf"(^|/){_ROW_PARALLEL}/lora_b$", PartitionSpec(None, None)),
    # Vocabulary-parallel embedding table [vocab, hidden] and output head [hidden, vocab].
    (r"(^|/)embed_tokens/embedding$", PartitionSpec("tensor", None)),
    (r"(^|/)lm_head/kernel$", PartitionSpec(None, "tensor")),
)

# Paths whose leading axis is the stacked layer axis (scanned; never sharded).
STACKED_PATH = r"(^|/)(blocks|layers)/"
# Dimensions FSDP must not take, by path: the LoRA rank (replicated, it is tiny and contracted twice).
FSDP_EXCLUDED_DIMS: tuple[tuple[str, int], ...] = ((r"(^|/)lora_a$", -1), (r"(^|/)lora_b$", -2))


# ----------------------------------------------------------------------------- mesh


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with a -1 entry replaced by the remaining device count.

    Raises ValueError when `shape` does not have 3 positive entries (one may be -1)
    or when their product is not `num_devices`.
    """
    shape = tuple(shape)
    if len(shape) != len(MESH_AXES) or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool)
                                                for s in shape):
        raise ValueError(f"mesh shape {shape!r}: expected {len(MESH_AXES)} integers for axes {MESH_AXES}")
    shape = tuple(int(s) for s in shape)
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {shape}: entries must be positive, with at most one -1 (= the rest)")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh shape {shape}: {num_devices} devices are not divisible by {known}, so -1 "
                             f"has no integer value")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh shape {shape} (axes {MESH_AXES}) has {math.prod(shape)} devices, but "
                         f"{num_devices} are available; the product must equal the device count")
    return shape  # type: ignore[return-value]


def make_mesh(shape: Sequence[int], devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A `Mesh` over all `devices` (default `jax.devices()`) with axes MESH_AXES and Auto axis types.

    shape: (data, fsdp, tensor); one entry may be -1 (= the rest of the devices).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(shape, len(devices))
    grid = _topology_grid(shape, devices)
    if grid is None or not _good_process_layout(_process_grid(grid)):
        grid = _process_ordered_grid(shape, devices)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _topology_grid(shape: tuple[int, int, int], devices: list) -> Optional[np.ndarray]:
    """JAX's topology-aware device array of `shape`, or None when JAX cannot lay it out."""
    slices = sorted({getattr(d, "slice_index", 0) for d in devices})
    if len(slices) > 1 and shape[0] % len(slices):
        raise ValueError(f"mesh shape {shape}: the devices span {len(slices)} TPU slices, which lie on the 'data' "
                         f"axis (the data-center network between slices is the slowest link); set mesh.shape's data "
                         f"entry to a multiple of {len(slices)}, e.g. --config.mesh.shape=({len(slices)},-1,1)")
    try:
        if len(slices) > 1:
            # Several TPU slices talk over the data-center network: put the slices on `data`
            # (the axis with the least traffic: one gradient reduction per step).
            per_slice = (shape[0] // len(slices), shape[1], shape[2])
            return np.asarray(mesh_utils.create_hybrid_device_mesh(per_slice, (len(slices), 1, 1), devices))
        mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
        return np.asarray(mesh.devices)
    except (ValueError, NotImplementedError, AssertionError):
        # Shapes the TPU topology helper cannot map (e.g. an axis that splits a physical ring oddly).
        return None


def _process_ordered_grid(shape: tuple[int, int, int], devices: list) -> np.ndarray:
    """Devices sorted by (process, id), reshaped row-major: each process fills consecutive batch shards."""
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    grid = np.empty(len(ordered), dtype=object)
    grid[:] = ordered
    return grid.reshape(shape)


def _process_grid(device_grid: np.ndarray) -> np.ndarray:
    """[data, fsdp, tensor] int array of each device's process index."""
    return np.vectorize(lambda d: d.process_index, otypes=[np.int64])(device_grid)


def batch_shards_by_process(process_grid: np.ndarray) -> dict[int, list[int]]:
    """For each process, the sorted batch-shard indices (data_i * fsdp + fsdp_i) that any of its devices hold.

    process_grid: [data, fsdp, tensor] int array of process indices (a device's `process_index`).
    """
    data, fsdp = process_grid.shape[:2]
    owners: dict[int, set[int]] = {}
    for d in range(data):
        for f in range(fsdp):
            for p in np.unique(process_grid[d, f]):
                owners.setdefault(int(p), set()).add(d * fsdp + f)
    return {p: sorted(shards) for p, shards in sorted(owners.items())}


def _good_process_layout(process_grid: np.ndarray) -> bool:
    """Contiguous, equal batch blocks per process, and no more shards per process than needed.

    A process needs ceil(batch shards / processes) shards; more means that a batch shard's tensor
    group spans processes needlessly (tensor collectives over the network, the same rows fed twice).
    """
    try:
        ranges = _check_process_blocks(process_grid)
    except ValueError:
        return False
    needed = -(-math.prod(process_grid.shape[:2]) // len(ranges))
    return all(len(r) == needed for r in ranges.values())


def _check_process_blocks(process_grid: np.ndarray) -> dict[int, range]:
    """Each process's batch shards as a range; raises unless they are contiguous and equally many."""
    owned = batch_shards_by_process(process_grid)
    ranges = {}
    for p, shards in owned.items():
        if shards != list(range(shards[0], shards[-1] + 1)):
            raise ValueError(f"process {p} holds batch shards {shards} of the mesh's ({' x '.join(BATCH_AXES)}) "
                             f"axes, which are not contiguous; every process must own one contiguous block of "
                             f"the batch (build the mesh with unite_jax.parallel.make_mesh)")
        ranges[p] = range(shards[0], shards[-1] + 1)
    counts = {len(r) for r in ranges.values()}
    if len(counts) > 1:
        raise ValueError(f"processes hold different numbers of batch shards "
                         f"({ {p: len(r) for p, r in ranges.items()} }); expected the same count for every process")
    return ranges


def num_batch_shards(mesh: Mesh) -> int:
    """Number of batch shards: the product of the BATCH_AXES sizes (data * fsdp)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def process_batch_shards(mesh: Mesh, process_index: Optional[int] = None) -> range:
    """The contiguous batch-shard indices held by `process_index`'s devices (default: this process).

    Raises ValueError when some process's shards are not contiguous or processes hold unequal counts.
    """
    process_index = jax.process_index() if process_index is None else process_index
    ranges = _check_process_blocks(_process_grid(np.asarray(mesh.devices)))
    if process_index not in ranges:
        raise ValueError(f"process {process_index} has no device in the mesh (processes in it: {sorted(ranges)})")
    return ranges[process_index]


def local_batch_shards(mesh: Mesh) -> int:
    """Batch shards whose devices are local to this process (num_batch_shards / process_count usually)."""
    return len(process_batch_shards(mesh))


# ----------------------------------------------------------------------------- parameters


def path_to_str(path: Iterable[Any]) -> str:
    """"/"-joined names of a `jax.tree_util` key path (dict keys, attribute names, sequence indices)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _axis_size(mesh_shape: Mapping[str, int], axis: Any) -> int:
    """Size of a spec entry (an axis name or a tuple of names); axes absent from the mesh count as 1."""
    names = axis if isinstance(axis, tuple) else (axis,)
    return math.prod(int(mesh_shape.get(n, 1)) for n in names)


def _drop_unit_axes(mesh_shape: Mapping[str, int], axis: Any) -> Any:
    """A spec entry without mesh axes of size 1 (None when nothing is left)."""
    names = axis if isinstance(axis, tuple) else (axis,)
    kept = tuple(n for n in names if int(mesh_shape.get(n, 1)) > 1)
    if not kept:
        return None
    return kept[0] if len(kept) == 1 else kept


def partition_spec(path: str, shape: Sequence[int], mesh_shape: Mapping[str, int],
                   rules: Sequence[tuple[str, PartitionSpec]] = PARTITION_RULES,
                   fsdp_min_size: int = 2**18) -> PartitionSpec:
    """The PartitionSpec of one array (pure: no devices needed).

    path: "/"-joined tree path; shape: the array's shape; mesh_shape: {axis name: size}.
    1. Tensor split: the first rule whose regex matches `path`; its spec is aligned with the
       trailing dimensions. An entry is kept only where its axes' size (> 1) divides the dimension.
    2. FSDP: if the array has >= fsdp_min_size elements and `fsdp` > 1, the largest dimension
       that is not the stacked layer axis (paths under blocks/ or layers/), not already split,
       not excluded (FSDP_EXCLUDED_DIMS: the LoRA rank) and divisible by `fsdp` goes on `fsdp`
       (the first such dimension on a tie). None qualifies: replicated over `fsdp`.
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    entries: list[Any] = [None] * ndim
    stacked = ndim > 0 and re.search(STACKED_PATH, path) is not None
    for pattern, spec in rules:
        if re.search(pattern, path) is None:
            continue
        if len(spec) > ndim:
            raise ValueError(f"partition rule {pattern!r} has spec {spec} for {len(spec)} dimensions, but "
                             f"{path} has shape {shape}")
        offset = ndim - len(spec)
        for i, axis in enumerate(spec):
            dim = offset + i
            axis = None if axis is None else _drop_unit_axes(mesh_shape, axis)
            if axis is None or (stacked and dim == 0):
                continue
            if shape[dim] % _axis_size(mesh_shape, axis) == 0:
                entries[dim] = axis
        break

    fsdp = int(mesh_shape.get("fsdp", 1))
    if fsdp > 1 and ndim > 0 and math.prod(shape) >= fsdp_min_size:
        excluded = {d % ndim for pattern, d in FSDP_EXCLUDED_DIMS if re.search(pattern, path) and ndim >= abs(d)}
        free = [d for d in range(ndim)
                if entries[d] is None and not (stacked and d == 0) and d not in excluded and shape[d] % fsdp == 0]
        if free:
            best = max(free, key=lambda d: (shape[d], -d))
            entries[best] = "fsdp"
    return PartitionSpec(*entries)


def param_shardings(abstract_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, PartitionSpec]] = PARTITION_RULES,
                    fsdp_min_size: int = 2**18) -> Any:
    """Tree of `NamedSharding` (same structure as `abstract_tree`) from the rules and FSDP (`partition_spec`).

    abstract_tree leaves need a `.shape` (jax.ShapeDtypeStruct, jax or numpy arrays); Python scalars count
    as shape ().
    """
    mesh_shape = dict(mesh.shape)

    def one(path, leaf):
        spec = partition_spec(path_to_str(path), np.shape(leaf), mesh_shape, rules, fsdp_min_size)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, abstract_tree)


# ----------------------------------------------------------------------------- placement


def put(value: Any, sharding: jax.sharding.Sharding, *, wait: bool = True) -> jax.Array:
    """One array (numpy or jax) placed with `sharding`: THE way host values reach the devices.

    With several processes every process passes the same full value and fills only its own devices'
    shards (`jax.make_array_from_callback`), so a full copy never has to fit on one device; an array that
    is already global is resharded. wait: block until the copy exists, so the caller may drop its host
    array right away (an asynchronous transfer keeps every host array alive until all finish).
    """
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        placed = jax.device_put(value, sharding)  # already global: a reshard
    else:
        host = np.asarray(value)
        placed = jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return jax.block_until_ready(placed) if wait else placed


def place_tree(tree: Any, shardings: Any, *, in_place: bool = False) -> Any:
    """`put` for every leaf of a nested dict, leaf by leaf; shardings: one Sharding or a tree mirroring `tree`.

    in_place: replace each leaf of `tree` itself as soon as its device copy exists, so each host array
    is released as it goes (loading a 7B model in bf16 then peaks at one copy of the weights plus one
    leaf, not two copies); otherwise a new tree is returned and `tree` is left as it was.
    """
    out = tree if in_place else {}
    for key, value in tree.items():
        sharding = shardings if isinstance(shardings, jax.sharding.Sharding) else shardings[key]
        if isinstance(value, dict):
            out[key] = place_tree(value, sharding, in_place=in_place)
        else:
            out[key] = put(value, sharding)
    return out


def to_host(array: jax.Array) -> np.ndarray:
    """A global array's full value as numpy on every process (gathered across processes when needed)."""
    if array.is_fully_addressable:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (nothing to wait for with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    """Tree of `jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding)`: Orbax restore targets.

    The shardings must use a concrete `Mesh` (Orbax rejects AbstractMesh shardings).
    """
    def one(path, leaf, sharding):
        if not isinstance(sharding, NamedSharding) or not isinstance(sharding.mesh, Mesh):
            raise ValueError(f"{path_to_str(path)}: expected a NamedSharding over a concrete Mesh, got {sharding!r}")
        return jax.ShapeDtypeStruct(tuple(np.shape(leaf)), leaf.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(one, abstract_tree, shardings)


# ----------------------------------------------------------------------------- batches


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 1) -> NamedSharding:
    """NamedSharding splitting dimension `batch_axis` of an `ndim`-dim array over BATCH_AXES.

    The trainer's arrays are [chunks, shards_or_rows, ...]: axis 1 is the batch axis by default.
    """
    if not 0 <= batch_axis < ndim:
        raise ValueError(f"batch_axis {batch_axis} is outside an array of {ndim} dimensions")
    entries: list[Any] = [None] * ndim
    entries[batch_axis] = BATCH_AXES
    return NamedSharding(mesh, PartitionSpec(*entries))


def host_to_global(local_tree: Any, mesh: Mesh, batch_axis: int = 1) -> Any:
    """Each process's local batch (numpy leaves) -> global `jax.Array`s split over BATCH_AXES.

    Every leaf's `batch_axis` holds this process's contiguous block of the global batch (its
    `process_batch_shards`); the global size on that axis is local * num_batch_shards /
    local_batch_shards (= local * process_count for the usual layouts; = local with one process).
    The local size must be divisible by local_batch_shards.
    """
    shards, local = num_batch_shards(mesh), local_batch_shards(mesh)

    def one(path, x):
        x = np.asarray(x)
        where = path_to_str(path) or "<leaf>"
        if x.ndim <= batch_axis:
            raise ValueError(f"batch field {where} has shape {x.shape}: no batch axis {batch_axis}")
        if x.shape[batch_axis] % local:
            raise ValueError(f"batch field {where} has {x.shape[batch_axis]} entries on axis {batch_axis}, not "
                             f"divisible by this process's {local} batch shards")
        global_shape = list(x.shape)
        global_shape[batch_axis] = x.shape[batch_axis] * shards // local
        sharding = batch_sharding(mesh, x.ndim, batch_axis)
        return jax.make_array_from_process_local_data(sharding, x, tuple(global_shape))

    return jax.tree_util.tree_map_with_path(one, local_tree)


# ----------------------------------------------------------------------------- multi-process

_TRUE = ("1", "true", "yes", "on")


def _int_env(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ.get(name, "0") or 0)
    except ValueError:
        return 0


def detect_multiprocess_launch(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Why the environment looks like a multi-process launch (a short reason), or None.

    Signals (all the same on every process of a launch, so they agree on whether to initialize):
    - JAX_COORDINATOR_ADDRESS set (with JAX_NUM_PROCESSES / JAX_PROCESS_ID, or a detectable cluster);
    - UNITE_JAX_DISTRIBUTED=1 (force jax's own cluster auto-detection, e.g. on a TPU pod whose
      worker list only lives in the metadata server);
    - SLURM: SLURM_NTASKS > 1 inside an srun step (SLURM_STEP_NODELIST set);
    - Open MPI: OMPI_COMM_WORLD_SIZE > 1;
    - Cloud TPU: more than one entry in TPU_PROCESS_ADDRESSES / TPU_WORKER_HOSTNAMES, or a multi-slice
      launch (MEGASCALE_COORDINATOR_ADDRESS set or MEGASCALE_NUM_SLICES > 1).
    """
    env = os.environ if environ is None else environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if env.get("UNITE_JAX_DISTRIBUTED", "").lower() in _TRUE:
        return "UNITE_JAX_DISTRIBUTED"
    if _int_env(env, "SLURM_NTASKS") > 1 and env.get("SLURM_STEP_NODELIST"):
        return "SLURM_NTASKS"
    if _int_env(env, "OMPI_COMM_WORLD_SIZE") > 1:
        return "OMPI_COMM_WORLD_SIZE"
    for name in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        hosts = [h for h in env.get(name, "").split(",") if h.strip()]
        if len(hosts) > 1:
            return name
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "MEGASCALE_COORDINATOR_ADDRESS"
    if _int_env(env, "MEGASCALE_NUM_SLICES") > 1:
        return "MEGASCALE_NUM_SLICES"
    return None


def maybe_initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None) -> bool:
    """Starts `jax.distributed` when asked to or when the environment is a multi-process launch.

    Explicit arguments (any not None) are passed to `jax.distributed.initialize`; otherwise, when
    `detect_multiprocess_launch()` gives a reason, it is called with JAX_COORDINATOR_ADDRESS /
    JAX_NUM_PROCESSES / JAX_PROCESS_ID from the environment where set, else with no arguments (jax
    detects SLURM, Open MPI and Cloud TPU clusters itself). Must run before any other JAX call.
    For CPU-only processes the collectives backend is set to gloo first (unless one is configured).
    A second call does nothing. Returns whether jax.distributed is active.

    On a TPU pod with no such environment variable JAX still runs multi-host through the TPU
    runtime without this call; set UNITE_JAX_DISTRIBUTED=1 to initialize anyway.
    """
    if jax.distributed.is_initialized():
        return True
    explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
    reason = "explicit arguments" if explicit else detect_multiprocess_launch()
    if reason is None:
        return False
    if not explicit:
        coordinator_address = os.environ.get("JAX_COORDINATOR_ADDRESS") or None
        num_processes = _int_env(os.environ, "JAX_NUM_PROCESSES") or None
        if os.environ.get("JAX_PROCESS_ID", "").strip():
            process_id = _int_env(os.environ, "JAX_PROCESS_ID")
    # CPU processes need a cross-process collectives backend; harmless for GPU/TPU clients.
    if str(jax.config.jax_cpu_collectives_implementation or "none").lower() in ("none", ""):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    except RuntimeError as e:
        raise RuntimeError(f"jax.distributed.initialize failed (multi-process launch detected from {reason}); it "
                           f"must run before any JAX computation or device query: {e}") from e
    return jax.distributed.is_initialized()
