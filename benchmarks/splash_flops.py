"""Flops of text attention on one TPU chip, splash kernel vs the XLA path, from the TPU compiler's cost analysis.

    python benchmarks/splash_flops.py [--topology=v5e:2x2] [--seq=2048]

Compiles (ahead of time, on this CPU host; needs libtpu) the causal attention of one row of `seq` tokens
with the 2B model's text heads (12 query heads, 2 key/value heads, head_dim 128, bfloat16), forward and
forward+backward, once per implementation, and prints one JSON line per case. The row holds one segment
after 10% left padding, as the trainer's rows do today.

XLA's cost analysis cannot see inside a Pallas kernel (a custom call): for splash it counts only the ops
around the kernel. So each splash line also gives the kernel's matmul flops counted from its block mask:
4 * bq * bkv * head_dim per computed (query block, key block) pair and head in the forward pass (scores and
values), 10 * ... in the fused backward (scores recomputed, dP, dV, dQ, dK).
"""

import argparse
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from unite_jax.model.attention import attention  # noqa: E402
from unite_jax.model.sharding import activation_mesh  # noqa: E402
from unite_jax.model.splash import _LARGE_BLOCKS, BLOCK  # noqa: E402


def kernel_flops(seq: int, heads: int, dim: int) -> tuple[float, float]:
    """(forward, forward+backward) matmul flops of the causal splash kernel, from its computed blocks."""
    import numpy as np

    block = next((b for b in _LARGE_BLOCKS if seq % b == 0), BLOCK)
    blocks = seq // block
    computed = int(np.tril(np.ones((blocks, blocks), bool)).sum())  # causal: key blocks at or below the diagonal
    per_block = block * block * dim * heads
    return 4.0 * per_block * computed, 14.0 * per_block * computed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--topology", default="v5e:2x2")
    parser.add_argument("--seq", type=int, default=2048)
    args = parser.parse_args()
    device = topologies.get_topology_desc(topology_name=args.topology, platform="tpu").devices[0]
    mesh = Mesh([device], ("data",))  # one chip: the kernel's own cost, no collectives
    replicated = NamedSharding(mesh, PartitionSpec())
    seq, heads, kv_heads, dim = args.seq, 12, 2, 128
    q = jax.ShapeDtypeStruct((1, seq, heads, dim), jnp.bfloat16, sharding=replicated)
    kv = jax.ShapeDtypeStruct((1, seq, kv_heads, dim), jnp.bfloat16, sharding=replicated)
    segments = jnp.where(jnp.arange(seq) < seq // 10, -1, 0)[None].astype(jnp.int32)

    for impl in ("xla", "splash"):
        def forward(q, k, v, impl=impl):
            return attention(q, k, v, segments, causal=True, impl=impl)

        def forward_backward(q, k, v, impl=impl):
            loss = lambda q, k, v: jnp.sum(forward(q, k, v).astype(jnp.float32))  # noqa: E731
            return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

        for name, fn in (("forward", forward), ("forward+backward", forward_backward)):
            with activation_mesh(mesh):
                compiled = jax.jit(fn).lower(q, kv, kv).compile()
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            record = {"impl": impl, "pass": name, "seq": seq, "topology": args.topology,
                      "flops_cost_analysis": float(cost.get("flops", float("nan"))),
                      "bytes_accessed": float(cost.get("bytes accessed", float("nan")))}
            if impl == "splash":
                forward_flops, both = kernel_flops(seq, heads, dim)
                record["kernel_flops_from_block_mask"] = forward_flops if name == "forward" else both
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
