"""LoRA for the LLM's linear layers: a separate pytree of (A, B) pairs beside frozen base weights.

For a linear with kernel W [in, out], LoRA adds a low-rank update
    y = x @ W (+ b) + scale * ((dropout(x) @ A) @ B),   A [in, rank], B [rank, out],
with scale = alpha / rank (`lora_scale`). Only A and B are trained.

The LoRA tree mirrors the parameter tree's paths with the decoder layers
stacked on the leading axis (like params.py), e.g.
    model/layers/self_attn/q_proj/lora_a   [num_layers, hidden, rank]
    model/layers/self_attn/q_proj/lora_b   [num_layers, rank, heads * head_dim]
    model/layers/mlp/down_proj/lora_a      [num_layers, intermediate, rank]
so partition rules written for `.../q_proj/kernel` extend naturally to
`.../q_proj/lora_a|lora_b`.

Using it:
- training: `embed(with_lora(params, lora), batch, cfg, run.replace(lora=LoraOptions(s, dropout=p)), rng)`,
  differentiated with respect to `lora` only. `with_lora` rebuilds dicts and
  shares every base array, so nothing is copied per step; pass the base params
  to the jitted step as an argument (not a closure) so they are not baked into
  the program as constants.
- export / next stage: `merge_lora(params, lora, s)` folds W + s * A @ B into
  the kernels (float32 math, cast back to the kernel's dtype).

Initialisation follows the common PEFT convention: B = 0 (the adapted model
starts equal to the base model) and A drawn from kaiming-uniform with
a = sqrt(5) over fan_in = in, i.e. A ~ Uniform(-1/sqrt(in), 1/sqrt(in)).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unite_jax.model.config import ModelConfig
from unite_jax.model.params import is_shape, param_shapes

# The seven linear layers of every decoder layer, by their parameter-tree names.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Which sub-module of `model/layers` holds each target.
_TARGET_MODULE = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                  "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
LORA_KEYS = ("lora_a", "lora_b")


def lora_scale(alpha: float, rank: int) -> float:
    """The LoRA branch multiplier alpha / rank (stage 1: 16 / 8 = 2; stage 2: 64 / 8 = 8)."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    return float(alpha) / rank


def _check_targets(targets: Sequence[str]) -> tuple[str, ...]:
    targets = tuple(targets)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets or len(set(targets)) != len(targets):
        raise ValueError(f"LoRA targets must be distinct names from {LORA_TARGETS}, got {targets}")
    return targets


def lora_shapes(cfg: ModelConfig, rank: int, targets: Sequence[str] = LORA_TARGETS) -> dict:
    """Tree of shape tuples: model/layers/{self_attn,mlp}/<target>/{lora_a [K, in, rank], lora_b [K, rank, out]}.

    Read off the base kernels' shapes [K, in, out] (params.param_shapes), so the two cannot drift apart.
    """
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    layers = param_shapes(cfg)["model"]["layers"]
    tree: dict = {}
    for name in _check_targets(targets):
        module = _TARGET_MODULE[name]
        num_layers, fan_in, fan_out = layers[module][name]["kernel"]
        tree.setdefault(module, {})[name] = {"lora_a": (num_layers, fan_in, rank),
                                             "lora_b": (num_layers, rank, fan_out)}
    return {"model": {"layers": tree}}


def abstract_lora(cfg: ModelConfig, rank: int, targets: Sequence[str] = LORA_TARGETS,
                  dtype: Any = "float32") -> dict:
    """`lora_shapes` with `jax.ShapeDtypeStruct` leaves (for abstract init and sharding rules)."""
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), lora_shapes(cfg, rank, targets),
                        is_leaf=is_shape)


def init_lora(cfg: ModelConfig, rank: int, *, seed_or_key, targets: Sequence[str] = LORA_TARGETS,
              dtype: Any = "float32") -> dict:
    """Initial LoRA tree (jax arrays) in the layout of `lora_shapes`.

    lora_a ~ Uniform(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform_(a=sqrt(5)) over fan_in = in),
    lora_b = 0, so the adapted forward starts equal to the base forward.
    seed_or_key: an int seed or a PRNG key. Target `name` draws from fold_in(key, LORA_TARGETS.index(name)),
    so a target's A does not depend on which other targets are chosen. Jit-able with a key argument.
    """
    if isinstance(seed_or_key, (int, np.integer)):
        key = jax.random.key(int(seed_or_key))
    else:
        key = seed_or_key
    return _init_lora(key, cfg, rank, _check_targets(targets), jnp.dtype(dtype).name)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _init_lora(key, cfg: ModelConfig, rank: int, targets: tuple[str, ...], dtype: str) -> dict:
    """`init_lora` as one compiled program (eagerly, every draw of a new shape would compile on its own)."""
    def make(path, shape):
        name, leaf = path[-2].key, path[-1].key
        if leaf == "lora_b":
            return jnp.zeros(shape, dtype)
        bound = 1.0 / np.sqrt(shape[1])
        target_key = jax.random.fold_in(key, LORA_TARGETS.index(name))
        return jax.random.uniform(target_key, shape, jnp.float32, -bound, bound).astype(dtype)

    return jax.tree_util.tree_map_with_path(make, lora_shapes(cfg, rank, targets), is_leaf=is_shape)


def _lora_pairs(lora: dict, path: tuple[str, ...] = ()):
    """Yields (path to a linear's dict, {"lora_a": A, "lora_b": B}) for every LoRA pair in `lora`."""
    if not isinstance(lora, dict):
        raise TypeError(f"LoRA tree at {'/'.join(path) or '<root>'}: expected a dict, got {type(lora).__name__}")
    if any(k in lora for k in LORA_KEYS):
        if set(lora) != set(LORA_KEYS):
            raise ValueError(f"LoRA tree at {'/'.join(path)}: expected exactly keys {LORA_KEYS}, got {sorted(lora)}")
        yield path, lora
        return
    for name, child in lora.items():
        yield from _lora_pairs(child, path + (name,))


def _linear_at(params: dict, path: tuple[str, ...]) -> dict:
    node = params
    for depth, name in enumerate(path):
        if not isinstance(node, dict) or name not in node:
            raise ValueError(f"LoRA path {'/'.join(path)}: the parameters have no {'/'.join(path[:depth + 1])}")
        node = node[name]
    if not isinstance(node, dict) or "kernel" not in node:
        raise ValueError(f"LoRA path {'/'.join(path)}: expected a linear layer with a 'kernel' in the parameters")
    if any(k in node for k in LORA_KEYS):
        raise ValueError(f"parameters at {'/'.join(path)} already carry LoRA leaves (with_lora applied twice?)")
    return node


def _check_pair(path: tuple[str, ...], kernel, a, b) -> None:
    """A [..., in, r] and B [..., r, out] must fit the kernel [..., in, out] (same leading layer axes)."""
    where = "/".join(path)
    if a.ndim != kernel.ndim or b.ndim != kernel.ndim:
        raise ValueError(f"{where}: lora_a {a.shape} / lora_b {b.shape} must have the kernel's rank "
                         f"({kernel.ndim}: {kernel.shape})")
    lead, (fan_in, fan_out) = kernel.shape[:-2], kernel.shape[-2:]
    rank = a.shape[-1]
    if a.shape != (*lead, fan_in, rank) or b.shape != (*lead, rank, fan_out):
        raise ValueError(f"{where}: expected lora_a {(*lead, fan_in, rank)} and lora_b {(*lead, rank, fan_out)} "
                         f"for kernel {kernel.shape}, got {a.shape} and {b.shape}")


def _replace_linears(params: dict, updates: dict[tuple[str, ...], dict]) -> dict:
    """A copy of the dict structure of `params` with the linear dicts at `updates`' paths replaced.

    Only dicts are rebuilt; every array leaf is the same object as in `params`.
    """
    def rebuild(node, path):
        if path in updates:
            return updates[path]
        if isinstance(node, dict):
            return {k: rebuild(v, path + (k,)) for k, v in node.items()}
        return node

    return rebuild(params, ())


def with_lora(params: dict, lora: dict) -> dict:
    """Params with `lora_a`/`lora_b` inserted next to `kernel` in every linear that `lora` targets.

    No array is copied (only dicts are rebuilt), so this is free inside a jitted step. The forward
    (`embed`, `text_model`) then adds the LoRA branch scaled by `run.lora.scale`.
    """
    updates = {}
    for path, pair in _lora_pairs(lora):
        linear = _linear_at(params, path)
        _check_pair(path, linear["kernel"], pair["lora_a"], pair["lora_b"])
        updates[path] = {**linear, "lora_a": pair["lora_a"], "lora_b": pair["lora_b"]}
    return _replace_linears(params, updates)


def merge_lora(params: dict, lora: dict, scale: float) -> dict:
    """Params with kernel <- kernel + scale * A @ B for every pair in `lora`; other leaves are shared.

    The update is computed in float32 (at full matmul precision, also on TPU) and cast back to the
    kernel's dtype. Host numpy inputs stay on the host (numpy math); jax arrays or tracers use jnp,
    so it works under jit with sharded arrays.
    """
    updates = {}
    for path, pair in _lora_pairs(lora):
        linear = _linear_at(params, path)
        kernel, a, b = linear["kernel"], pair["lora_a"], pair["lora_b"]
        _check_pair(path, kernel, a, b)
        updates[path] = {**linear, "kernel": _merged_kernel(kernel, a, b, scale)}
    return _replace_linears(params, updates)


def _merged_kernel(kernel, a, b, scale: float):
    """kernel [..., in, out] + scale * a [..., in, r] @ b [..., r, out], float32 math, kernel's dtype."""
    if all(isinstance(x, np.ndarray) for x in (kernel, a, b)) and isinstance(scale, (int, float, np.number)):
        delta = np.matmul(a.astype(np.float32), b.astype(np.float32))
        return (kernel.astype(np.float32) + np.float32(scale) * delta).astype(kernel.dtype)
    delta = jnp.matmul(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return (jnp.asarray(kernel, jnp.float32) + scale * delta).astype(kernel.dtype)

