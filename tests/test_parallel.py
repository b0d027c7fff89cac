"""Mesh construction, partition rules, host -> global batches, distributed start-up (unite_jax.parallel).

Expected specs below are worked out by hand from the rules' description (the
tensor split of each linear, then FSDP on the largest free divisible
dimension); the sharded forward is compared with the same function run on
unsharded parameters.
"""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from unite_jax import parallel
from unite_jax.model import lora as lora_lib
from unite_jax.model.config import preset
from unite_jax.model.options import LoraOptions, RunOptions
from unite_jax.model.params import abstract_params, init_params
from unite_jax.model.text import text_model
from unite_jax.model.vision import vision_tower

LLM_COLUMN = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "gate_proj": "mlp",
              "up_proj": "mlp"}
LLM_ROW = {"o_proj": "self_attn", "down_proj": "mlp"}


# ----------------------------------------------------------------------------- mesh


@pytest.mark.parametrize("shape, expected", [((8, 1, 1), (8, 1, 1)), ((2, 2, 2), (2, 2, 2)),
                                             ((-1, 2, 1), (4, 2, 1)), ((1, -1, 2), (1, 4, 2))])
def test_make_mesh_shapes(shape, expected):
    mesh = parallel.make_mesh(shape)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape[a] for a in mesh.axis_names) == expected
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
    assert parallel.num_batch_shards(mesh) == expected[0] * expected[1]
    # one process: it owns every batch shard
    assert parallel.local_batch_shards(mesh) == expected[0] * expected[1]
    assert parallel.process_batch_shards(mesh) == range(expected[0] * expected[1])


@pytest.mark.parametrize("shape", [(3, 1, 1), (4, 4, 1), (-1, -1, 2), (-1, 3, 1), (2, 2), (2, 2, 2, 1),
                                   (0, 4, 2), (-2, 4, 1), (2.0, 2, 2), (True, 8, 1)])
def test_make_mesh_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match="mesh shape"):
        parallel.make_mesh(shape)


def test_make_mesh_on_a_device_subset():
    devices = jax.devices()[:4]
    mesh = parallel.make_mesh((-1, 1, 2), devices=devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 2}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)


def _fake_devices(process_of_each):
    return [types.SimpleNamespace(id=i, process_index=p) for i, p in enumerate(process_of_each)]


def test_batch_shards_by_process_contiguous_and_not():
    # 2 processes x 4 devices on (data 2, fsdp 2, tensor 2), process = data index: blocks [0, 1] and [2, 3].
    grid = np.array([0, 0, 0, 0, 1, 1, 1, 1]).reshape(2, 2, 2)
    assert parallel.batch_shards_by_process(grid) == {0: [0, 1], 1: [2, 3]}
    assert parallel._check_process_blocks(grid) == {0: range(0, 2), 1: range(2, 4)}
    # tensor split across the processes: both own every batch shard (still contiguous).
    grid = np.array([0, 1] * 4).reshape(2, 2, 2)
    assert parallel.batch_shards_by_process(grid) == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}
    # processes alternate along fsdp: process 0 holds shards 0 and 2 -> not contiguous.
    grid = np.array([0, 0, 1, 1, 0, 0, 1, 1]).reshape(2, 2, 2)
    with pytest.raises(ValueError, match=r"process 0 holds batch shards \[0, 2\]"):
        parallel._check_process_blocks(grid)
    # unequal blocks
    grid = np.array([0, 0, 0, 0, 0, 0, 1, 1]).reshape(1, 4, 2)
    with pytest.raises(ValueError, match="different numbers of batch shards"):
        parallel._check_process_blocks(grid)


def test_process_ordered_grid_gives_contiguous_blocks():
    # Devices listed with the processes interleaved (as a topology-aware order may do).
    devices = _fake_devices([0, 1, 0, 1, 0, 1, 0, 1])
    grid = parallel._process_ordered_grid((1, 4, 2), devices)
    processes = parallel._process_grid(grid)
    assert processes.tolist() == [[[0, 0], [0, 0], [1, 1], [1, 1]]]
    assert parallel._check_process_blocks(processes) == {0: range(0, 2), 1: range(2, 4)}
    assert parallel._good_process_layout(processes)
    # the given order is rejected: both processes would hold every batch shard (tensor across processes)
    interleaved = np.array([d.process_index for d in devices]).reshape(1, 4, 2)
    assert not parallel._good_process_layout(interleaved)
    # processes alternating along fsdp: not contiguous
    assert not parallel._good_process_layout(np.array([0, 0, 1, 1, 0, 0, 1, 1]).reshape(1, 4, 2))
    # tensor wider than a process: sharing a batch shard is unavoidable and accepted
    assert parallel._good_process_layout(np.array([0, 0, 0, 0, 1, 1, 1, 1]).reshape(1, 1, 8))


# ----------------------------------------------------------------------------- partition rules


def _specs(shardings):
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    return {parallel.path_to_str(path): s.spec for path, s in flat}


def _shapes(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {parallel.path_to_str(path): tuple(leaf.shape) for path, leaf in flat}


def _padded(spec, ndim):
    return tuple(spec) + (None,) * (ndim - len(spec))


def _check_valid(specs, shapes, mesh):
    """Every named axis exists, divides its dimension, is used once; stacked layer axes are whole."""
    for path, spec in specs.items():
        shape = shapes[path]
        entries = _padded(spec, len(shape))
        assert len(entries) == len(shape), path
        used = []
        for dim, axis in enumerate(entries):
            if axis is None:
                continue
            names = axis if isinstance(axis, tuple) else (axis,)
            used += names
            size = math.prod(mesh.shape[n] for n in names)
            assert shape[dim] % size == 0, (path, shape, spec)
        assert len(used) == len(set(used)), (path, spec)
        if "/blocks/" in path or "/layers/" in path:
            assert entries[0] is None, (path, spec)


@pytest.mark.parametrize("mesh_shape", [(1, 4, 2), (2, 2, 2)])
def test_param_shardings_2b(mesh_shape):
    mesh = parallel.make_mesh(mesh_shape)
    abstract = abstract_params(preset("2b"))  # shapes only, nothing allocated
    shardings = parallel.param_shardings(abstract, mesh)
    specs, shapes = _specs(shardings), _shapes(abstract)
    assert specs.keys() == shapes.keys()
    _check_valid(specs, shapes, mesh)
    for name, module in LLM_COLUMN.items():
        spec = specs[f"model/layers/{module}/{name}/kernel"]
        assert _padded(spec, 3)[2] == "tensor", (name, spec)
        assert _padded(spec, 3)[1] == "fsdp", (name, spec)  # the only other shardable dim
    for name, module in LLM_ROW.items():
        spec = _padded(specs[f"model/layers/{module}/{name}/kernel"], 3)
        assert spec == (None, "tensor", "fsdp"), (name, spec)
    assert _padded(specs["visual/blocks/attn/qkv/kernel"], 3) == (None, "fsdp", "tensor")
    assert _padded(specs["visual/blocks/mlp/fc2/kernel"], 3) == (None, "tensor", "fsdp")
    # [151936, 1536]: vocabulary on tensor, hidden on fsdp
    assert _padded(specs["model/embed_tokens/embedding"], 2) == ("tensor", "fsdp")
    # small leaves stay replicated
    assert all(a is None for a in specs["model/layers/input_layernorm/weight"])

    # Per-device memory: compare the shards' sizes with the full arrays.
    full = sum(math.prod(s) * 4 for s in shapes.values())
    flat_shardings = jax.tree_util.tree_flatten_with_path(shardings)[0]
    per_device = sum(math.prod(s.shard_shape(shapes[parallel.path_to_str(p)])) * 4 for p, s in flat_shardings)
    assert 2.0e9 < full / 4 < 2.5e9  # ~2.2B parameters
    expected = mesh.shape["fsdp"] * mesh.shape["tensor"]
    assert expected * 0.95 < full / per_device <= expected, (full / per_device, expected)


def test_param_shardings_tiny_by_hand():
    mesh = parallel.make_mesh((1, 4, 2))
    abstract = abstract_params(preset("tiny"))
    shapes = _shapes(abstract)
    # Default threshold: tiny arrays are never FSDP-sharded, only tensor-split.
    specs = _specs(parallel.param_shardings(abstract, mesh))
    assert _padded(specs["model/layers/self_attn/q_proj/kernel"], 3) == (None, None, "tensor")
    assert all(a is None for a in specs["model/embed_tokens/embedding"][1:])
    # Threshold 0: FSDP wherever a free dimension divides by 4.
    specs = _specs(parallel.param_shardings(abstract, mesh, fsdp_min_size=0))
    _check_valid(specs, shapes, mesh)
    expected = {
        "model/layers/self_attn/q_proj/kernel": (None, "fsdp", "tensor"),  # [2, 64, 64]
        "model/layers/self_attn/k_proj/kernel": (None, "fsdp", "tensor"),  # [2, 64, 32]
        "model/layers/self_attn/q_proj/bias": (None, "tensor"),  # [2, 64]: out on tensor, layer axis whole
        "model/layers/self_attn/o_proj/kernel": (None, "tensor", "fsdp"),
        "model/layers/mlp/down_proj/kernel": (None, "tensor", "fsdp"),  # [2, 128, 64]
        "model/layers/input_layernorm/weight": (None, "fsdp"),  # [2, 64]
        "model/norm/weight": ("fsdp",),
        "visual/merger/mlp/0/kernel": ("fsdp", "tensor"),  # [256, 256]
        "visual/merger/mlp/2/kernel": ("tensor", "fsdp"),  # [256, 64]
        "visual/patch_embed/proj/kernel": ("fsdp", None),  # [1176, 64]: 1176 = 4 * 294 is the largest
    }
    for path, spec in expected.items():
        assert _padded(specs[path], len(shapes[path])) == spec, (path, shapes[path], specs[path])


def test_param_shardings_lora_2b():
    mesh = parallel.make_mesh((1, 4, 2))
    abstract = lora_lib.abstract_lora(preset("2b"), rank=8)
    specs, shapes = _specs(parallel.param_shardings(abstract, mesh)), _shapes(abstract)
    _check_valid(specs, shapes, mesh)
    layers = "model/layers"
    expected = {
        # q: A [28, 1536, 8] in-side free -> fsdp (344064 elements >= 2**18); B [28, 8, 1536] out on tensor
        f"{layers}/self_attn/q_proj/lora_a": (None, "fsdp", None),
        f"{layers}/self_attn/q_proj/lora_b": (None, None, "tensor"),
        # gate: A [28, 1536, 8]; B [28, 8, 8960] out on tensor
        f"{layers}/mlp/gate_proj/lora_a": (None, "fsdp", None),
        f"{layers}/mlp/gate_proj/lora_b": (None, None, "tensor"),
        # down: A [28, 8960, 8] in on tensor (rank never sharded); B [28, 8, 1536] -> fsdp on out
        f"{layers}/mlp/down_proj/lora_a": (None, "tensor", None),
        f"{layers}/mlp/down_proj/lora_b": (None, None, "fsdp"),
        # k: A [28, 1536, 8]; B [28, 8, 256] = 57344 elements < 2**18: tensor only
        f"{layers}/self_attn/k_proj/lora_b": (None, None, "tensor"),
    }
    for path, spec in expected.items():
        assert _padded(specs[path], 3) == spec, (path, shapes[path], specs[path])


def test_partition_spec_falls_back_when_not_divisible():
    mesh_shape = {"data": 1, "fsdp": 4, "tensor": 4}
    # [2, 6, 6]: neither 4 | 6 -> fully replicated, no error
    assert parallel.partition_spec("model/layers/self_attn/k_proj/kernel", (2, 6, 6), mesh_shape,
                                   fsdp_min_size=0) == P(None, None, None)
    # tensor does not divide out (6), fsdp takes in (8)
    assert parallel.partition_spec("model/layers/mlp/up_proj/kernel", (3, 8, 6), mesh_shape,
                                   fsdp_min_size=0) == P(None, "fsdp", None)
    # the stacked layer axis is never FSDP-sharded, even when it is the only divisible dimension
    assert parallel.partition_spec("visual/blocks/norm1/weight", (8, 5), mesh_shape,
                                   fsdp_min_size=0) == P(None, None)
    # unstacked kernel with the same rule: trailing alignment
    assert parallel.partition_spec("q_proj/kernel", (8, 12), mesh_shape, fsdp_min_size=0) == P("fsdp", "tensor")
    # scalars (e.g. an optimizer step count)
    assert parallel.partition_spec("count", (), mesh_shape, fsdp_min_size=0) == P()


def test_param_shardings_axes_of_size_one_replicate_everything():
    mesh = parallel.make_mesh((8, 1, 1))
    specs = _specs(parallel.param_shardings(abstract_params(preset("2b")), mesh))
    assert all(all(a is None for a in spec) for spec in specs.values())


def test_param_shardings_cover_optimizer_state():
    mesh = parallel.make_mesh((1, 4, 2))
    abstract = abstract_params(preset("tiny"))
    state = jax.eval_shape(optax.adamw(1e-3).init, abstract)
    specs = _specs(parallel.param_shardings(state, mesh, fsdp_min_size=0))
    param_specs = _specs(parallel.param_shardings(abstract, mesh, fsdp_min_size=0))
    mu = {path: spec for path, spec in specs.items() if "/mu/" in path}
    assert len(mu) == len(param_specs)
    for path, spec in mu.items():
        assert spec == param_specs[path.split("/mu/", 1)[1]], path
    counts = [spec for path, spec in specs.items() if path.endswith("count")]
    assert counts and all(spec == P() for spec in counts)


# ----------------------------------------------------------------------------- sharded forward


def test_sharded_forward_matches_unsharded():
    """Vision tower + vocab-parallel embedding lookup + LLM with LoRA on a (2, 2, 2) mesh."""
    cfg = preset("tiny")
    run = RunOptions(lora=LoraOptions(2.0))
    params = init_params(cfg, seed=1)
    lora = lora_lib.init_lora(cfg, 4, seed_or_key=2)
    rng = np.random.default_rng(3)
    lora = jax.tree.map(lambda x: np.asarray(rng.standard_normal(x.shape) * 0.05, np.float32), lora)
    batch, seq, patches = 4, 8, 16
    inputs = {
        "input_ids": rng.integers(0, cfg.text.vocab_size, (batch, seq)).astype(np.int32),
        "attention_mask": np.concatenate([np.zeros((batch, 2), np.int32), np.ones((batch, seq - 2), np.int32)], 1),
        "position_ids": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, 3, seq)).copy(),
        "patches": rng.standard_normal((batch, patches, cfg.vision.patch_dim)).astype(np.float32),
        "segment_ids": np.repeat(np.arange(2, dtype=np.int32), 8)[None].repeat(batch, 0),
        "patch_positions": np.stack(np.meshgrid(np.arange(4), np.arange(4), indexing="ij"), -1)
                             .reshape(1, patches, 2).repeat(batch, 0).astype(np.int32),
    }

    def forward(params, lora, inputs):
        visual = vision_tower(params["visual"], inputs["patches"], inputs["segment_ids"],
                              inputs["patch_positions"], cfg, run)
        embeds = jnp.take(params["model"]["embed_tokens"]["embedding"], inputs["input_ids"], axis=0)
        model = lora_lib.with_lora(params, lora)["model"]
        hidden = text_model(model, embeds, inputs["attention_mask"], inputs["position_ids"], cfg, run)
        return visual, hidden

    expected = jax.jit(forward)(params, lora, inputs)

    mesh = parallel.make_mesh((2, 2, 2))
    param_sh = parallel.param_shardings(params, mesh, fsdp_min_size=0)
    lora_sh = parallel.param_shardings(lora, mesh, fsdp_min_size=0)
    input_sh = jax.tree.map(lambda x: parallel.batch_sharding(mesh, x.ndim, batch_axis=0), inputs)
    sharded_params = parallel.place_tree(params, param_sh)
    sharded_lora = parallel.place_tree(lora, lora_sh)
    sharded_inputs = parallel.place_tree(inputs, input_sh)
    q_kernel = sharded_params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q_kernel.sharding.spec == P(None, "fsdp", "tensor")
    assert q_kernel.addressable_shards[0].data.shape == (2, 32, 32)
    got = jax.jit(forward, in_shardings=(param_sh, lora_sh, input_sh))(sharded_params, sharded_lora, sharded_inputs)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=2e-5, atol=2e-5)


# ----------------------------------------------------------------------------- batches and trees


def test_batch_sharding_spec():
    mesh = parallel.make_mesh((2, 2, 2))
    assert parallel.batch_sharding(mesh, 3).spec == P(None, ("data", "fsdp"), None)
    assert parallel.batch_sharding(mesh, 2, batch_axis=0).spec == P(("data", "fsdp"), None)
    with pytest.raises(ValueError, match="batch_axis 2"):
        parallel.batch_sharding(mesh, 2, batch_axis=2)


def test_host_to_global_round_trip():
    mesh = parallel.make_mesh((2, 2, 2))  # 4 batch shards, all local
    local = {
        "input_ids": np.arange(3 * 8 * 5, dtype=np.int32).reshape(3, 8, 5),  # [chunks, rows, seq]
        "patches": np.random.default_rng(0).standard_normal((3, 4, 6, 2)).astype(np.float32),  # [C, shards, ...]
        "modality": np.arange(3 * 4, dtype=np.int32).reshape(3, 4),
    }
    out = parallel.host_to_global(local, mesh)
    for name, x in local.items():
        arr = out[name]
        assert arr.shape == x.shape and arr.dtype == x.dtype
        np.testing.assert_array_equal(np.asarray(arr), x)
        assert arr.sharding.spec == P(None, ("data", "fsdp"), *([None] * (x.ndim - 2)))
        rows_per_shard = x.shape[1] // 4
        for shard in arr.addressable_shards:
            # device at mesh position (data d, fsdp f) holds rows of batch shard 2 * d + f
            (d, f, _), = np.argwhere(np.vectorize(lambda dev, shard=shard: dev == shard.device)(mesh.devices))
            b = 2 * d + f
            np.testing.assert_array_equal(np.asarray(shard.data), x[:, b * rows_per_shard:(b + 1) * rows_per_shard])


def test_host_to_global_errors():
    mesh = parallel.make_mesh((2, 2, 2))
    with pytest.raises(ValueError, match="labels has 6 entries on axis 1"):
        parallel.host_to_global({"labels": np.zeros((2, 6))}, mesh)
    with pytest.raises(ValueError, match="scale has shape \\(3,\\): no batch axis 1"):
        parallel.host_to_global({"scale": np.zeros(3)}, mesh)


def test_shard_tree_and_abstract_targets():
    mesh = parallel.make_mesh((1, 4, 2))
    tree = {"model": {"layers": {"mlp": {"up_proj": {"kernel": np.arange(2 * 8 * 6, dtype=np.float32)
                                                                 .reshape(2, 8, 6)}}}},
            "step": np.int32(7)}
    shardings = parallel.param_shardings(tree, mesh, fsdp_min_size=0)
    placed = parallel.place_tree(tree, shardings)
    kernel = placed["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding == shardings["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding.spec == P(None, "fsdp", "tensor")
    np.testing.assert_array_equal(np.asarray(kernel), tree["model"]["layers"]["mlp"]["up_proj"]["kernel"])
    assert int(placed["step"]) == 7
    abstract = parallel.abstract_with_shardings(jax.eval_shape(lambda t: t, tree), shardings)
    target = abstract["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(target, jax.ShapeDtypeStruct)
    assert target.shape == (2, 8, 6) and target.dtype == np.float32 and target.sharding.spec == kernel.sharding.spec
    assert isinstance(target.sharding.mesh, jax.sharding.Mesh)
    bad = jax.tree.map(lambda s: NamedSharding(mesh.abstract_mesh, s.spec), shardings)
    with pytest.raises(ValueError, match="concrete Mesh"):
        parallel.abstract_with_shardings(abstract, bad)


# ----------------------------------------------------------------------------- distributed start-up

_LAUNCH_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "UNITE_JAX_DISTRIBUTED",
                "SLURM_NTASKS", "SLURM_STEP_NODELIST", "OMPI_COMM_WORLD_SIZE", "TPU_PROCESS_ADDRESSES",
                "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "MEGASCALE_NUM_SLICES")


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"SLURM_NTASKS": "1", "SLURM_STEP_NODELIST": "n1"}, None),
    ({"SLURM_NTASKS": "4"}, None),  # a batch script outside srun runs one process
    ({"SLURM_NTASKS": "4", "SLURM_STEP_NODELIST": "n[1-4]"}, "SLURM_NTASKS"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, "TPU_WORKER_HOSTNAMES"),
    ({"MEGASCALE_NUM_SLICES": "1"}, None),
    ({"MEGASCALE_NUM_SLICES": "2"}, "MEGASCALE_NUM_SLICES"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_SIZE"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS"),
    ({"UNITE_JAX_DISTRIBUTED": "1"}, "UNITE_JAX_DISTRIBUTED"),
    ({"UNITE_JAX_DISTRIBUTED": "0"}, None),
])
def test_detect_multiprocess_launch(environ, expected):
    assert parallel.detect_multiprocess_launch(environ) == expected


def test_maybe_initialize_distributed_is_a_no_op_without_a_launch(monkeypatch):
    for name in _LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    assert parallel.maybe_initialize_distributed() is False
    assert calls == []
    assert not jax.distributed.is_initialized()


def test_maybe_initialize_distributed_explicit_and_idempotent(monkeypatch):
    state = {"up": False, "calls": []}

    def fake_initialize(**kwargs):
        state["calls"].append(kwargs)
        state["up"] = True

    monkeypatch.setattr(jax.distributed, "initialize", fake_initialize)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: state["up"])
    assert parallel.maybe_initialize_distributed("127.0.0.1:9999", 2, 1) is True
    assert state["calls"] == [{"coordinator_address": "127.0.0.1:9999", "num_processes": 2, "process_id": 1}]
    assert parallel.maybe_initialize_distributed("127.0.0.1:9999", 2, 1) is True
    assert len(state["calls"]) == 1
    assert jax.config.jax_cpu_collectives_implementation == "gloo"


def test_maybe_initialize_distributed_from_environment(monkeypatch):
    for name in _LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    state = {"up": False, "calls": []}

    def fake_initialize(**kwargs):
        state["calls"].append(kwargs)
        state["up"] = True

    monkeypatch.setattr(jax.distributed, "initialize", fake_initialize)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: state["up"])
    assert parallel.maybe_initialize_distributed() is True
    assert state["calls"] == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 0}]
