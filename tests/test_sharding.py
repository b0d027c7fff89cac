"""Sharding that scales, proved on the 8-device CPU mesh with the trainer's own jitted step.

- per-device flops of the compiled step on (1, 8, 1) and (8, 1, 1) are within 15% of 1/8 of the
  single-device step's flops for the same global batch (no redundant compute);
- no all-gather in the compiled program moves a per-token activation of the global batch (a
  dimension of B * seq_len token rows, or a [B, ..., seq_len] / [shards, patches] array), while the
  same step traced without the activation pins does (so the check can fail);
- with lora.rank = 0, the optimizer state that `jit_create_state` makes holds 1/8 of its bytes per
  device, up to the small leaves (norms, biases) that FSDP leaves replicated.
"""

import re

import jax
import pytest

from unite_jax import parallel
from unite_jax.configs import stage1
from unite_jax.model import sharding as sharding_lib
from unite_jax.train import aot, jitted
from unite_jax.train.optim import make_optimizer

GLOBAL_BATCH, SEQ, PATCHES = 40, 128, 64


def _config(mesh_shape):
    c = stage1.get_config("tiny")  # lora.rank = 0: every weight trains
    c.train.global_batch_size = GLOBAL_BATCH
    c.data.seq_len, c.data.patches_per_row, c.data.vision_block = SEQ, PATCHES, PATCHES
    c.model.attention_impl = "xla"
    c.mesh.shape = mesh_shape
    return c


def _mid_model(cfg, layers=2):
    """Matrices big enough for FSDP to split (>= 2^18 elements; the tiny preset's all stay replicated);
    with 4 layers every stacked matrix qualifies and only norms and biases stay replicated."""
    from unite_jax.model.config import TextConfig, VisionConfig

    return cfg.replace(
        vision=VisionConfig(depth=layers, embed_dim=256, num_heads=4, mlp_ratio=4.0, out_hidden_size=512),
        text=TextConfig(vocab_size=1024, hidden_size=512, intermediate_size=1536, num_layers=layers, num_heads=8,
                        num_kv_heads=2, mrope_section=(8, 12, 12)))


def _compiled(mesh_shape, devices, mid=False):
    config = _config(mesh_shape)
    cfg, run = aot.model_and_run(config, platform="cpu")
    lowered, *_ = aot.lower_step(config, devices, _mid_model(cfg) if mid else cfg, run)
    return lowered.compile()


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


@pytest.fixture(scope="module")
def single_device_flops():
    return _flops(_compiled((1, 1, 1), jax.devices()[:1]))


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (8, 1, 1)])
def test_per_device_flops_are_an_eighth(mesh_shape, single_device_flops):
    per_device = _flops(_compiled(mesh_shape, jax.devices()))
    ratio = per_device / (single_device_flops / 8)
    assert 0.85 <= ratio <= 1.15, f"{mesh_shape}: per-device flops {per_device:.3e} = {ratio:.3f} x 1/8 of one device"


_ALL_GATHER = re.compile(r"= (\w+)\[([\d,]*)\][^=]*? all-gather(?:-start)?\(")


def activation_gathers(hlo_text: str) -> list[str]:
    """All-gathers whose result is a per-token activation of the global batch."""
    shards = 8
    rows = {GLOBAL_BATCH * SEQ, GLOBAL_BATCH * PATCHES, GLOBAL_BATCH * PATCHES // 4}
    found = []
    for match in _ALL_GATHER.finditer(hlo_text):
        dims = [int(d) for d in match.group(2).split(",") if d]
        per_token = any(d in rows for d in dims)
        text_rows = GLOBAL_BATCH in dims and SEQ in dims
        vision_rows = shards in dims and GLOBAL_BATCH // shards * PATCHES in dims
        if per_token or text_rows or vision_rows:
            found.append(f"{match.group(1)}[{match.group(2)}]")
    return found


def test_no_activation_all_gather_under_fsdp(monkeypatch):
    compiled = _compiled((1, 8, 1), jax.devices(), mid=True)
    assert activation_gathers(compiled.as_text()) == []
    # Control: without the carry pins XLA's propagation gathers activations over the batch, so the
    # check above has something to catch.
    monkeypatch.setattr(sharding_lib, "current_mesh", lambda: None)
    unpinned = _compiled((1, 8, 1), jax.devices(), mid=True)
    assert activation_gathers(unpinned.as_text()), "the unpinned step gathered no activation"


def test_full_finetuning_optimizer_state_is_an_eighth_per_device():
    """A model big enough for FSDP to split its matrices (>= 2^18 elements); the trainer's create_state."""
    from unite_jax.model.config import preset
    from unite_jax.model.params import init_params

    cfg = _mid_model(preset("tiny"), layers=4)
    mesh = parallel.make_mesh((1, 8, 1))
    params = init_params(cfg, seed=0)
    trainable = parallel.place_tree(params, parallel.param_shardings(params, mesh))
    tx, _ = make_optimizer(1e-4, 10)
    shardings = jitted.state_shardings(tx, trainable, mesh)
    state = jitted.jit_create_state(tx, 0, shardings)(trainable)
    leaves = jax.tree.leaves(state.opt_state)
    total = sum(x.nbytes for x in leaves)
    per_device = {}
    for leaf in leaves:
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    assert len(per_device) == 8
    worst = max(per_device.values())
    # norms and biases (0.2% of the bytes here) are replicated; everything else is split 8 ways
    assert worst <= total / 8 * 1.02, f"per-device optimizer state {worst} vs total {total} / 8 = {total / 8}"
