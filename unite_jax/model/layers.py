"""Small building blocks shared by the vision tower and the LLM."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unite_jax.model.options import LoraOptions
from unite_jax.model.sharding import constrain_batch


def linear(x: jnp.ndarray, p: dict, dtype, *, lora: LoraOptions | None = None, rng=None) -> jnp.ndarray:
    """x [..., in] @ kernel [in, out] (+ bias), matmul in `dtype`; plus the LoRA branch when `lora` is on.

    The leading axes are flattened first so that the weight gradient in the
    backward pass is one plain GEMM (a dot contracting several axes at once
    misses the fast GEMM path on XLA:CPU and runs several times slower).

    LoRA is on only when the run says so (`lora` given) AND this linear carries
    `lora_a` [in, rank] and `lora_b` [rank, out] (see model/lora.py; linears that
    LoRA does not target have none):
        y = x @ kernel (+ bias) + lora.scale * ((dropout(x) @ lora_a) @ lora_b)
    with both LoRA matmuls in `dtype`. The dropout is inverted dropout on the
    LoRA branch input only (the base path always sees x), applied only when
    `rng` is given and `lora.dropout` > 0: keep = jax.random.bernoulli(rng,
    1 - lora.dropout, x.shape), dropout(x) = where(keep, x / (1 - lora.dropout), 0).
    LoRA leaves without `lora` are an error: they would silently train nothing.
    """
    # Rows stay split over the mesh's batch axes, in the forward and (through the constraint's transpose)
    # the backward pass: under FSDP the kernel is gathered, never the rows (a no-op without a mesh).
    x2 = constrain_batch(x.astype(dtype).reshape(-1, x.shape[-1]))
    kernel = p["kernel"].astype(dtype)
    y = constrain_batch(jnp.matmul(x2, kernel))
    if "bias" in p:
        y = y + p["bias"].astype(dtype)
    if "lora_a" in p or "lora_b" in p:
        if "lora_a" not in p or "lora_b" not in p:
            raise ValueError(f"a LoRA linear needs both 'lora_a' and 'lora_b', got keys {sorted(p)}")
        if lora is None:
            raise ValueError("the linear carries lora_a/lora_b but the run has no LoRA; pass RunOptions(lora="
                             "LoraOptions(scale=lora.lora_scale(alpha, rank), dropout=...))")
        y = y + lora.scale * _lora_branch(x, x2, p, dtype, lora.dropout, rng)
    return y.reshape(*x.shape[:-1], kernel.shape[-1])


def _lora_branch(x, x2, p: dict, dtype, dropout_rate: float, rng) -> jnp.ndarray:
    """(dropout(x) @ lora_a) @ lora_b over the flattened rows x2 [rows, in] -> [rows, out], in `dtype`."""
    if rng is not None and dropout_rate > 0:
        keep = jax.random.bernoulli(rng, 1.0 - dropout_rate, x.shape).reshape(x2.shape)
        # rescale in float32 so a bf16 input is rounded once, not also by a rounded 1 / (1 - rate)
        kept = (x2.astype(jnp.float32) / (1.0 - dropout_rate)).astype(dtype)
        x2 = jnp.where(keep, kept, jnp.zeros((), dtype))
    return jnp.matmul(jnp.matmul(x2, p["lora_a"].astype(dtype)), p["lora_b"].astype(dtype))


def layer_norm(x: jnp.ndarray, p: dict, eps: float) -> jnp.ndarray:
    """LayerNorm over the last axis, statistics in float32, result in x's dtype."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    y = y * p["weight"].astype(jnp.float32) + p["bias"].astype(jnp.float32)
    return y.astype(dtype)


def rms_norm(x: jnp.ndarray, weight: jnp.ndarray, eps: float) -> jnp.ndarray:
    """RMSNorm over the last axis in float32; the weight multiplies after the cast back, as in Qwen2."""
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * y.astype(dtype).astype(jnp.float32)).astype(dtype)


def quick_gelu(x: jnp.ndarray) -> jnp.ndarray:
    return x * jax.nn.sigmoid(1.702 * x)


def activation(name: str):
    if name == "quick_gelu":
        return quick_gelu
    if name in ("gelu", "gelu_pytorch_exact"):
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "silu":
        return jax.nn.silu
    raise ValueError(f"unsupported activation {name!r}")


def remat_policy(name: str):
    """Maps the config's remat name to a `jax.checkpoint` policy (None = no remat)."""
    if name == "none":
        return None
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    if name == "dots":
        return jax.checkpoint_policies.checkpoint_dots
    if name == "dots_no_batch":
        return jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
    raise ValueError(f"unknown remat policy {name!r}")


def scan_layers(body, carry, stacked_params, *, remat: str, use_scan: bool = True):
    """Applies `body(carry, layer_params) -> carry` over the leading layer axis of `stacked_params`.

    With `use_scan` the layers run under `jax.lax.scan` (one compiled layer,
    flat compile time); otherwise as an unrolled Python loop (debugging).
    """
    policy = remat_policy(remat)
    if policy is not None:
        body = jax.checkpoint(body, policy=policy, prevent_cse=not use_scan)
    if use_scan:
        carry, _ = jax.lax.scan(lambda c, p: (body(c, p), None), carry, stacked_params)
        return carry
    num_layers = jax.tree.leaves(stacked_params)[0].shape[0]
    for i in range(num_layers):
        carry = body(carry, jax.tree.map(lambda a, i=i: a[i], stacked_params))
    return carry
