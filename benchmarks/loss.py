"""Memory and time of the MAMCL loss (dense vs chunked) and of GradCache vs a plain step.

Prints one JSON object per line.

Part 1, "loss": loss + gradient with respect to query and candidate (jit, value_and_grad) at
global batch 1k, 2k, ... up to --max_batch, D = --dim, dense vs chunked (--chunk_size).
Memory comes from the compiled executable's memory analysis (works on CPU, which has no
allocator statistics): `temp_bytes` is the working set XLA allocates beyond the inputs and
outputs (the "peak memory growth"), `peak_bytes` = arguments + outputs + temp - aliased.
Batches up to --time_max_batch are also run and timed (plus the allocator's peak on GPU/TPU);
larger ones are only compiled. Failures (e.g. out of memory) are reported, not raised.

Part 2, "gradcache": the largest contrastive batch whose step fits in --budget_gib, for a plain
full-batch step and for GradCache (sub-batches of --sub_batch rows), on a small token-MLP
embedder whose per-example activations (tokens x hidden) dwarf its embedding, as a
transformer's do. Both steps use the chunked loss so the loss is not the limit of either.

    python benchmarks/loss.py --max_batch 32768 --time_max_batch 4096
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from unite_jax.gradcache import gradcache_value_and_grad
from unite_jax.loss import mamcl_loss

CODES = np.array([1, 2, 4, 3, 5], np.int32)


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def memory_of(compiled) -> dict:
    """Compile-time memory analysis of an executable: temp (working set) and peak bytes."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {}
    temp = int(analysis.temp_size_in_bytes)
    arguments = int(analysis.argument_size_in_bytes)
    outputs = int(analysis.output_size_in_bytes)
    aliased = int(analysis.alias_size_in_bytes)
    return {"temp_bytes": temp, "argument_bytes": arguments, "output_bytes": outputs,
            "peak_bytes": arguments + outputs + temp - aliased}


def allocator_peak() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def gib(n) -> float | None:
    return None if n is None else round(n / 2**30, 4)


def time_call(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


# ----------------------------------------------------------------------------
# Part 1: loss + gradient


def loss_step(chunk_size):
    def loss(query, candidate, modality):
        return mamcl_loss(query, candidate, modality, chunk_size=chunk_size)[0]

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def random_inputs(batch: int, dim: int, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 3)

    def normalised(key):
        x = jax.random.normal(key, (batch, dim), jnp.float32)
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    modality = jnp.asarray(CODES)[jax.random.randint(keys[2], (batch,), 0, len(CODES))]
    return normalised(keys[0]), normalised(keys[1]), modality


def bench_loss(args) -> None:
    batch = args.min_batch
    while batch <= args.max_batch:
        for mode, chunk_size in (("dense", None), ("chunked", args.chunk_size)):
            record = {"bench": "loss", "mode": mode, "batch": batch, "dim": args.dim, "chunk_size": chunk_size,
                      "device": jax.devices()[0].device_kind}
            step = loss_step(chunk_size)
            try:
                shapes = (jax.ShapeDtypeStruct((batch, args.dim), jnp.float32),) * 2 + (
                    jax.ShapeDtypeStruct((batch,), jnp.int32),)
                compiled = step.lower(*shapes).compile()
                memory = memory_of(compiled)
                record.update({k.replace("_bytes", "_gib"): gib(v) for k, v in memory.items()})
                if batch <= args.time_max_batch:
                    record["time_s"] = round(time_call(compiled, random_inputs(batch, args.dim), args.repeats), 4)
                    peak = allocator_peak()
                    if peak is not None:
                        record["allocator_peak_gib"] = gib(peak)
            except Exception as error:  # noqa: BLE001 - reported, e.g. RESOURCE_EXHAUSTED
                record["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            emit(record)
        batch *= 2


# ----------------------------------------------------------------------------
# Part 2: GradCache vs plain step at a memory budget


def token_mlp_params(features: int, hidden: int, dim: int):
    keys = jax.random.split(jax.random.key(1), 2)
    return {"w1": jax.random.normal(keys[0], (features, hidden), jnp.float32) / np.sqrt(features),
            "w2": jax.random.normal(keys[1], (hidden, dim), jnp.float32) / np.sqrt(hidden)}


def token_mlp_embed(params, batch):
    """batch["tokens"] [rows, tokens, features] -> mean-pooled MLP embedding [rows, dim], normalised."""
    hidden = jax.nn.gelu(batch["tokens"] @ params["w1"])  # [rows, tokens, hidden]: the activations
    pooled = jnp.mean(hidden @ params["w2"], axis=1)
    return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)


def plain_step(params, queries, candidates, modality, chunk_size):
    def loss(p):
        return mamcl_loss(token_mlp_embed(p, queries), token_mlp_embed(p, candidates), modality,
                          chunk_size=chunk_size)[0]

    return jax.value_and_grad(loss)(params)


def gradcache_step(params, queries, candidates, modality, chunk_size, num_chunks, remat):
    # contiguous sub-batches (a free reshape): chunk-major order is the batch order, as `modality` is
    stack = lambda tree: jax.tree.map(lambda x: x.reshape((num_chunks, -1) + x.shape[1:]), tree)  # noqa: E731
    loss_fn = lambda q, c: mamcl_loss(q, c, modality, chunk_size=chunk_size)[0]  # noqa: E731
    value, _, grads = gradcache_value_and_grad(token_mlp_embed, loss_fn, params, stack(queries), stack(candidates),
                                               num_chunks=num_chunks, has_aux=False, remat=remat)
    return value, grads


def step_shapes(args, batch):
    tokens = jax.ShapeDtypeStruct((batch, args.tokens, args.features), jnp.float32)
    return ({"tokens": tokens}, {"tokens": tokens}, jax.ShapeDtypeStruct((batch,), jnp.int32))


def compile_step(args, method, batch, remat=False):
    params = token_mlp_params(args.features, args.hidden, args.embed_dim)
    if method == "plain":
        fn = functools.partial(plain_step, chunk_size=args.gradcache_loss_chunk)
    else:
        fn = functools.partial(gradcache_step, chunk_size=args.gradcache_loss_chunk,
                               num_chunks=max(1, batch // args.sub_batch), remat=remat)
    return jax.jit(fn).lower(params, *step_shapes(args, batch)).compile(), params


def bench_gradcache(args) -> None:
    budget = int(args.budget_gib * 2**30)
    model = {"tokens": args.tokens, "features": args.features, "hidden": args.hidden, "embed_dim": args.embed_dim,
             "loss_chunk_size": args.gradcache_loss_chunk, "sub_batch": args.sub_batch}
    largest = {}
    for method in ("plain", "gradcache"):
        batch, largest[method] = args.sub_batch, None
        while batch <= args.gradcache_max_batch:
            record = {"bench": "gradcache", "method": method, "batch": batch, **model}
            try:
                memory = memory_of(compile_step(args, method, batch)[0])
                record.update({k.replace("_bytes", "_gib"): gib(v) for k, v in memory.items()})
            except Exception as error:  # noqa: BLE001
                record["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
                emit(record)
                break
            emit(record)
            if memory["peak_bytes"] > budget:
                break
            largest[method] = batch
            batch *= 2
    ratio = None if not largest["plain"] or not largest["gradcache"] else largest["gradcache"] / largest["plain"]
    emit({"bench": "gradcache_summary", "budget_gib": args.budget_gib, "largest_plain_batch": largest["plain"],
          "largest_gradcache_batch": largest["gradcache"], "ratio": ratio,
          "capped_at_max_batch": largest["gradcache"] == args.gradcache_max_batch, **model})

    # The remat option at one size: same peak, one more forward pass.
    batch = args.gradcache_time_batch
    for remat in (False, True):
        compiled, params = compile_step(args, "gradcache", batch, remat)
        emit({"bench": "gradcache_remat", "remat": remat, "batch": batch,
              **{k.replace("_bytes", "_gib"): gib(v) for k, v in memory_of(compiled).items()}})

    # Step time at a small batch: GradCache does two forward passes and one backward.
    rng = np.random.default_rng(0)
    data = ({"tokens": jnp.asarray(rng.normal(size=(batch, args.tokens, args.features)), jnp.float32)},
            {"tokens": jnp.asarray(rng.normal(size=(batch, args.tokens, args.features)), jnp.float32)},
            jnp.asarray(rng.choice(CODES, size=batch)))
    for method in ("plain", "gradcache"):
        compiled, params = compile_step(args, method, batch)
        emit({"bench": "gradcache_time", "method": method, "batch": batch,
              "time_s": round(time_call(compiled, (params, *data), args.repeats), 4),
              "device": jax.devices()[0].device_kind})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min_batch", type=int, default=1024)
    parser.add_argument("--max_batch", type=int, default=32768, help="64k needs ~48 GiB dense (compile only)")
    parser.add_argument("--time_max_batch", type=int, default=4096, help="run and time batches up to this")
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--chunk_size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--budget_gib", type=float, default=2.0, help="GradCache comparison memory budget")
    parser.add_argument("--gradcache_max_batch", type=int, default=262144)
    parser.add_argument("--gradcache_time_batch", type=int, default=512)
    parser.add_argument("--sub_batch", type=int, default=128, help="GradCache rows per sub-batch")
    parser.add_argument("--gradcache_loss_chunk", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--embed_dim", type=int, default=256)
    parser.add_argument("--skip_loss", action="store_true")
    parser.add_argument("--skip_gradcache", action="store_true")
    args = parser.parse_args()
    emit({"bench": "setup", "jax": jax.__version__, "backend": jax.default_backend(),
          "device": jax.devices()[0].device_kind, "devices": jax.device_count()})
    if not args.skip_loss:
        bench_loss(args)
    if not args.skip_gradcache:
        bench_gradcache(args)


if __name__ == "__main__":
    main()
