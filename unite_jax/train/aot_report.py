"""What the AOT checker tells a user: the per-chip figures, a verdict, and the knobs that would help.

`find_chunks` answers "with how many GradCache chunks does my recipe fit?" by
compiling with 1, 2, 4, ... chunks (each a divisor of the per-shard batch)
until the step fits.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

from unite_jax import parallel
from unite_jax.train.aot import Report, Target, check

GIB = 2**30


def gib(num_bytes: float) -> str:
    if num_bytes < GIB / 10:
        return f"{num_bytes / 2**20:.1f} MiB"
    return f"{num_bytes / GIB:.2f} GiB"


def describe(report: Report, config) -> str:
    """A short multi-line summary of one compilation."""
    mesh = " ".join(f"{axis}={size}" for axis, size in report.mesh.items())
    flops = f"{report.flops_per_chip:.3e} per step (model flops: train/flops.py)"
    if not math.isnan(report.compiler_flops_per_chip):
        flops += f"; XLA cost analysis {report.compiler_flops_per_chip:.3e} (counts each loop body once)"
    share = report.total_bytes / report.capacity_bytes
    verdict = f"fits ({share:.0%} of HBM)" if report.fits else f"DOES NOT FIT ({share:.0%} of HBM)"
    lines = [
        f"{config.stage} {config.preset} on {report.target}: {report.chips} x {report.chip_kind}, mesh {mesh}, "
        f"global batch {config.train.global_batch_size}, {report.chunks} GradCache chunk(s), "
        f"lora.rank={config.lora.rank}, attention {report.attention}",
        f"  parameters       {gib(report.params_bytes):>12}   per chip",
        f"  optimizer state  {gib(report.opt_state_bytes):>12}",
        f"  batch            {gib(report.batch_bytes):>12}",
        f"  temporaries      {gib(report.temp_bytes):>12}",
        f"  total            {gib(report.total_bytes):>12}   of {gib(report.capacity_bytes)}: {verdict}",
        f"  flops per chip   {flops}",
        *([f"  executable       {gib(report.executable_bytes):>12}   (memory_analysis of the compiled step: an "
           f"estimate that can exceed the compiler's HBM check)"] if report.executable_bytes else []),
        f"  compile          {report.compile_seconds:.0f} s (memory from {report.memory_source})",
    ]
    lines += [f"  note: {note}" for note in report.notes]
    return "\n".join(lines)


def as_json(report: Report, config) -> str:
    record = dataclasses.asdict(report)
    record.update(fits=report.fits, stage=config.stage, preset=config.preset,
                  global_batch_size=int(config.train.global_batch_size), lora_rank=int(config.lora.rank))
    if math.isnan(record["compiler_flops_per_chip"]):
        record["compiler_flops_per_chip"] = None
    return json.dumps(record)


def markdown_row(report: Report, config) -> str:
    """| recipe | topology | chips | fits | HBM per chip | chunks | compile |"""
    fits = "yes" if report.fits else "no"
    return (f"| {config.stage} {config.preset} @ {config.train.global_batch_size} | {report.target} | {report.chips} "
            f"| {fits} | {report.total_bytes / GIB:.1f} / {report.capacity_bytes / GIB:.2f} GiB | {report.chunks} "
            f"| {report.compile_seconds:.0f} s |")


def chunk_options(config, shards: int) -> list[int]:
    """GradCache chunk counts that split the global batch evenly over the batch shards: 1, 2, 4, ..."""
    per_shard = int(config.train.global_batch_size) // shards
    return [c for c in (2**i for i in range(16)) if c <= per_shard and per_shard % c == 0]


def suggestions(report: Report, config) -> list[str]:
    """Knobs that shrink what dominates the per-chip total, most effective first."""
    out = []
    chips, mesh = report.chips, report.mesh
    shards = mesh.get("data", 1) * mesh.get("fsdp", 1)
    state = report.params_bytes + report.opt_state_bytes
    bigger = [c for c in chunk_options(config, shards) if c > report.chunks]
    if report.temp_bytes >= state:
        if bigger:
            out.append(f"--config.train.grad_cache_chunks={bigger[0]} (GradCache: the exact full-batch gradient with "
                       f"the activations of 1/{bigger[0]} of the batch; --find_chunks searches the smallest that fits)")
        if config.model.remat != "full":
            out.append("--config.model.remat=full (recompute each layer in the backward pass)")
        out.append(f"smaller budgets per example: --config.data.seq_len (now {config.data.seq_len}) or "
                   f"--config.data.patches_per_row (now {config.data.patches_per_row}); activations scale with both")
        out.append(f"a smaller --config.train.global_batch_size (now {config.train.global_batch_size}; changes the "
                   f"recipe: fewer negatives per query)")
    if mesh.get("fsdp", 1) < chips:
        out.append("--config.mesh.shape=(1,-1,1) (FSDP over every chip: parameters and optimizer state split "
                   f"{chips} ways)")
    if config.lora.rank == 0:
        out.append("--config.lora.rank=8 (LoRA: optimizer state for the adapters only)")
    out.append("a topology with more chips or more HBM per chip")
    return out


def find_chunks(config, target: Target, *, fast: bool) -> tuple[Report, list[Report]]:
    """(first report that fits, or the last tried; every report) over 1, 2, 4, ... GradCache chunks.

    The search reads memory without code generation; the answer is then compiled in full unless `fast`.
    """
    shards = parallel.num_batch_shards(parallel.make_mesh(tuple(config.mesh.shape), devices=target.devices()))
    tried = []
    for chunks in chunk_options(config, shards):
        if chunks < int(config.train.grad_cache_chunks):
            continue
        trial = copy.deepcopy(config)
        with trial.unlocked():
            trial.train.grad_cache_chunks = chunks
        report = check(trial, target, fast=True)
        tried.append(report)
        if report.fits:
            return (report if fast else check(trial, target, fast=False)), tried
    return tried[-1], tried
