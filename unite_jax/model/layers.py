"""Small building blocks shared by the vision tower and the LLM."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def linear(x: jnp.ndarray, p: dict, dtype) -> jnp.ndarray:
    """x [..., in] @ kernel [in, out] (+ bias), matmul in `dtype`.

    The leading axes are flattened first so that the weight gradient in the
    backward pass is one plain GEMM (a dot contracting several axes at once
    misses the fast GEMM path on XLA:CPU and runs several times slower).
    """
    kernel = p["kernel"].astype(dtype)
    y = jnp.matmul(x.astype(dtype).reshape(-1, x.shape[-1]), kernel).reshape(*x.shape[:-1], kernel.shape[-1])
    if "bias" in p:
        y = y + p["bias"].astype(dtype)
    return y


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
        carry = body(carry, jax.tree.map(lambda a: a[i], stacked_params))
    return carry
