"""Ahead-of-time compilation of the real train step for a TPU topology this machine does not have.

With `libtpu` installed (the `tpu` extra), JAX describes any Cloud TPU topology
on a CPU host (`jax.experimental.topologies`) and runs the real TPU compiler on
it. `check(config, topology)` builds exactly what `launch/train.py` jits:

- the model config and its run options for the TPU (splash attention unless
  model.attention_impl says otherwise);
- the device mesh of `mesh.shape` over the topology's chips, with the
  partition rules of `unite_jax.parallel` (several slices: the slices on the
  `data` axis, over the data-center network);
- abstract parameters (`jax.eval_shape`-style shape/dtype structs: no weight is
  ever materialised), the abstract train state with the trainer's shardings, and
  an abstract batch from the data layer's `batch_shapes`;
- `jitted.jit_train_step`, the same jitted function the trainer calls;

then lowers and compiles it, and reads the TPU executable's memory and cost
analyses. See aot_memory.py for how the per-chip figures are read (including
the fast path that stops after buffer assignment).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import traceback
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from unite_jax import parallel
from unite_jax.data import media
from unite_jax.data.batch_shapes import batch_shapes
from unite_jax.data.spec import BatchSpec
from unite_jax.model import lora as lora_lib
from unite_jax.model.config import ModelConfig, preset
from unite_jax.model.options import RunOptions
from unite_jax.model.params import abstract_params
from unite_jax.train import aot_memory, jitted
from unite_jax.train.flops import step_flops
from unite_jax.train.optim import make_optimizer
from unite_jax.train.state import create_state

# Parameters the embedding never reads (the LM head): frozen even in full fine-tuning (train/loop.py).
UNUSED_BY_EMBEDDING = ("lm_head",)


class CompileError(RuntimeError):
    """The step could not be compiled for the target (not a memory overflow)."""


@dataclasses.dataclass
class Target:
    """A TPU topology to compile for: `name` as Cloud TPU spells it (v5e:4x4, v5p:2x2x4, v6e:4x4)."""

    name: str
    slices: int = 1

    @property
    def label(self) -> str:
        return self.name if self.slices == 1 else f"{self.slices}x {self.name}"

    def devices(self) -> list:
        from jax.experimental import topologies

        # libtpu takes a machine-wide lock file when loaded; compiling only, several checkers (and test
        # processes) on one host may hold it at once.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        kwargs = {"num_slices": self.slices} if self.slices > 1 else {}
        try:
            return list(topologies.get_topology_desc(topology_name=self.name, platform="tpu", **kwargs).devices)
        except RuntimeError as e:  # JaxRuntimeError subclasses RuntimeError
            raise ValueError(f"--topology={self.name!r}: libtpu cannot describe it ({str(e).splitlines()[0]}); "
                             f"expected names like v5e:4x4, v6e:4x4, v5p:2x2x4 (chips per axis)") from e


@dataclasses.dataclass
class Report:
    """What one compilation says about a recipe on a target (bytes are per chip).

    total_bytes is what the TPU compiler's own HBM check counts (arguments + outputs + temporaries of its
    buffer assignment); `fits` is the compiler's verdict (a full compile) or total <= capacity (fast).
    executable_bytes is the compiled executable's `memory_analysis()` (arguments + outputs - aliases +
    temporaries), which XLA documents as an estimate: on TPU it can exceed what the HBM check counts.
    """

    target: str
    chips: int
    chip_kind: str
    mesh: dict
    chunks: int
    attention: str
    params_bytes: int
    opt_state_bytes: int
    batch_bytes: int
    total_bytes: int
    capacity_bytes: int
    fits: bool
    flops_per_chip: float  # model flops of the step / chips (train/flops.py)
    compiler_flops_per_chip: float  # XLA's cost analysis (loop bodies counted once); NaN when not compiled in full
    executable_bytes: int | None
    compile_seconds: float
    memory_source: str
    notes: list = dataclasses.field(default_factory=list)

    @property
    def temp_bytes(self) -> int:
        """Temporaries: the total less what the state and the batch hold (the donated state aliases its output)."""
        return max(0, self.total_bytes - self.params_bytes - self.opt_state_bytes - self.batch_bytes)


# ---------------------------------------------------------------------------- abstract inputs
def model_and_run(config, platform: str = "tpu") -> tuple[ModelConfig, RunOptions]:
    """The run's architecture and run options as the trainer builds them, for `platform`; a random init or
    an unset model.init uses the architecture of model.preset (no weights are read either way)."""
    from unite_jax.train.loop import run_options
    from unite_jax.train.model_init import model_config

    run = run_options(config, platform=platform)
    if config.model.init in ("", "random"):
        return preset(config.model.preset), run
    return model_config(config.model), run


def _sharded(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def abstract_trainable(config, cfg: ModelConfig, run: RunOptions) -> tuple[dict, dict]:
    """(frozen, trainable) as shape/dtype structs, split as the trainer splits the real trees."""
    base = abstract_params(cfg, run.param_dtype)
    if config.lora.rank > 0:
        targets = tuple(t.strip() for t in str(config.lora.targets).split(",") if t.strip())
        return base, lora_lib.abstract_lora(cfg, config.lora.rank, targets, dtype=config.train.master_dtype)
    master = jnp.dtype(config.train.master_dtype)
    frozen = {k: v for k, v in base.items() if k in UNUSED_BY_EMBEDDING}
    trainable = {k: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, master), v) for k, v in base.items()
                 if k not in UNUSED_BY_EMBEDDING}
    return frozen, trainable


def global_batch_spec(config, cfg: ModelConfig, run: RunOptions, mesh) -> BatchSpec:
    """The BatchSpec of the whole global batch (as if one process fed every batch shard)."""
    from unite_jax.train.loop import batch_geometry

    chunks, rows_per_shard, _ = batch_geometry(config, mesh)
    return BatchSpec.from_config(config.data, num_chunks=chunks, local_shards=parallel.num_batch_shards(mesh),
                                 rows_per_shard=rows_per_shard, pad_id=0, patch_dim=cfg.vision.patch_dim,
                                 merge_size=cfg.vision.spatial_merge_size, position_mode=run.positions)


def abstract_batch(config, cfg: ModelConfig, run: RunOptions, mesh) -> dict:
    """The global batch as shape/dtype structs split over the mesh's batch axes (axis 1), from batch_shapes."""
    spec = global_batch_spec(config, cfg, run, mesh)

    def leaf(entry):
        shape, dtype = entry
        return jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.batch_sharding(mesh, len(shape), 1))

    return jax.tree.map(leaf, batch_shapes(spec), is_leaf=lambda x: isinstance(x, tuple))


# ---------------------------------------------------------------------------- compile
def lower_step(config, devices: list, cfg: ModelConfig, run: RunOptions):
    """(lowered train step, mesh, abstract state, abstract frozen, abstract batch) over `devices`

    (a topology's compile-only TPU devices, or real ones: the 8 CPU devices of the tests)."""
    mesh = parallel.make_mesh(tuple(config.mesh.shape), devices=devices)
    tx, schedule = make_optimizer(config.train.learning_rate, int(config.train.steps),
                                  warmup_fraction=config.train.warmup_fraction,
                                  weight_decay=config.train.weight_decay, b1=config.train.adam_b1,
                                  b2=config.train.adam_b2, eps=config.train.adam_eps,
                                  clip_norm=config.train.clip_norm)
    frozen, trainable = abstract_trainable(config, cfg, run)
    frozen = _sharded(frozen, parallel.param_shardings(frozen, mesh))
    shardings = jitted.state_shardings(tx, trainable, mesh, config.seed)
    state = _sharded(jax.eval_shape(lambda t: create_state(t, tx, config.seed), trainable), shardings)
    batch = abstract_batch(config, cfg, run, mesh)
    step = jitted.jit_train_step(config, cfg, run, mesh, tx=tx, schedule=schedule, shardings=shardings,
                                 pixel_table=media.normalize_table(media.ProcessorConfig()))
    return step.lower(state, frozen, batch), mesh, state, frozen, batch


def per_chip_bytes(tree: Any) -> int:
    """Bytes one chip holds of a tree of sharded shape/dtype structs (the largest shard of each leaf)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = leaf.sharding
        shape = sharding.shard_shape(leaf.shape) if isinstance(sharding, NamedSharding) else leaf.shape
        total += int(np.prod(shape)) * jnp.dtype(leaf.dtype).itemsize
    return total


def check(config, target: Target, *, fast: bool = False) -> Report:
    """Compiles the run's train step for `target` and reports its per-chip memory and flops.

    fast=True reads the memory from the compiler's buffer assignment and skips code generation (see
    aot_memory.py); the compiler's cost analysis is then unknown (NaN): it needs the executable.
    With splash attention, a kernel that does not lower for these shapes is reported in `notes` and
    the step is compiled with the XLA attention path instead.
    """
    cfg, run = model_and_run(config, "tpu")
    notes = []
    try:
        return _check(config, target, cfg, run, fast, notes)
    except CompileError as e:
        if run.attention_impl != "splash":
            raise
        notes.append(f"splash attention did not compile for these shapes ({e}); the XLA attention path is used")
        return _check(config, target, cfg, run.replace(attention_impl="xla"), fast, notes)


def _raised_in_kernel(error: BaseException) -> bool:
    """Whether `error` comes from the splash kernel or Pallas (its traceback passes through them)."""
    frames = traceback.extract_tb(error.__traceback__)
    return any("splash" in frame.filename or "pallas" in frame.filename for frame in frames)


def _check(config, target: Target, cfg: ModelConfig, run: RunOptions, fast: bool, notes: list) -> Report:
    start = time.perf_counter()
    try:
        lowered, mesh, state, frozen, batch = lower_step(config, target.devices(), cfg, run)
    except Exception as e:  # a kernel that rejects its shapes fails while tracing
        if run.attention_impl == "splash" and _raised_in_kernel(e):
            raise CompileError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        raise
    capacity = aot_memory.hbm_capacity(mesh)
    params = per_chip_bytes(frozen) + per_chip_bytes(state.trainable)
    opt_state = per_chip_bytes(state.opt_state) + per_chip_bytes((state.step, state.rng))
    flops = step_flops(cfg, global_batch_spec(config, cfg, run, mesh), trains_weights=config.lora.rank == 0,
                       remat=run.remat != "none") / mesh.size
    report = functools.partial(Report, target.label, mesh.size, mesh.devices.flat[0].device_kind, dict(mesh.shape),
                               int(config.train.grad_cache_chunks), run.attention_impl, params, opt_state,
                               per_chip_bytes(batch), capacity_bytes=capacity, flops_per_chip=flops, notes=notes)
    # the compiler's own figure, from its buffer assignment (seconds: no code generation)
    try:
        assigned = aot_memory.buffer_assignment_total(lowered)
    except Exception as e:  # noqa: BLE001 - a program the TPU compiler rejects (e.g. a kernel that does not lower)
        raise CompileError(str(e).splitlines()[0][:500]) from e
    if fast:
        return report(total_bytes=assigned, fits=assigned <= capacity, compiler_flops_per_chip=float("nan"),
                      executable_bytes=None, compile_seconds=time.perf_counter() - start,
                      memory_source="buffer assignment (no code generation)")
    try:
        compiled = lowered.compile()
    except Exception as e:
        if not aot_memory.is_out_of_memory(e):
            raise CompileError(str(e).splitlines()[0][:500]) from e
        # over the limit even after the compiler's own rematerialisation: its final figure
        return report(total_bytes=aot_memory.required_bytes(e), fits=False, compiler_flops_per_chip=float("nan"),
                      executable_bytes=None, compile_seconds=time.perf_counter() - start,
                      memory_source="compiler (out of memory)")
    stats = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    executable = int(stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
                     + stats.temp_size_in_bytes)
    return report(total_bytes=assigned, fits=True, compiler_flops_per_chip=float(cost.get("flops", float("nan"))),
                  executable_bytes=executable, compile_seconds=time.perf_counter() - start,
                  memory_source="buffer assignment; compiled in full")
