"""The parameter tree: names, shapes and random initialisation.

Paths mirror the Hugging Face module names so conversion is a name table plus
transposes. Per-layer weights are stacked on a leading layer axis (`blocks`,
`layers`) and applied with `jax.lax.scan`.

Conventions:
- `kernel` is a linear weight stored [in, out] (the transpose of torch's
  `weight` [out, in]); `bias` is [out].
- `weight` of a norm (and `bias` of a LayerNorm) and `embedding` [vocab, hidden]
  are stored as in torch.
- The patch embedding Conv3d (kernel == stride, no bias) is the linear map
  `patches [N, C*T*P*P] @ kernel [C*T*P*P, embed_dim]`.

Tree (L = vision depth, K = LLM layers):
  visual/patch_embed/proj/kernel                    [C*T*P*P, E]
  visual/blocks/norm1/{weight,bias}                 [L, E]
  visual/blocks/norm2/{weight,bias}                 [L, E]
  visual/blocks/attn/qkv/{kernel [L,E,3E], bias [L,3E]}
  visual/blocks/attn/proj/{kernel [L,E,E], bias [L,E]}
  visual/blocks/mlp/fc1/{kernel [L,E,M], bias [L,M]}
  visual/blocks/mlp/fc2/{kernel [L,M,E], bias [L,E]}
  visual/merger/ln_q/{weight,bias}                  [E]
  visual/merger/mlp/0/{kernel [4E,4E], bias [4E]}
  visual/merger/mlp/2/{kernel [4E,H], bias [H]}
  model/embed_tokens/embedding                      [V, H]
  model/layers/input_layernorm/weight               [K, H]
  model/layers/post_attention_layernorm/weight      [K, H]
  model/layers/self_attn/{q,k,v}_proj/{kernel, bias}  [K,H,heads*hd] / [K,H,kv*hd]
  model/layers/self_attn/o_proj/kernel              [K, heads*hd, H]
  model/layers/mlp/{gate,up}_proj/kernel            [K, H, I]
  model/layers/mlp/down_proj/kernel                 [K, I, H]
  model/norm/weight                                 [H]
  lm_head/kernel                                    [H, V]   (only when embeddings are untied)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unite_jax.model.config import ModelConfig

Params = dict[str, Any]


def param_shapes(cfg: ModelConfig) -> Params:
    """Nested dict of shape tuples, the layout documented in this module."""
    v, t = cfg.vision, cfg.text
    e, m, merged = v.embed_dim, v.mlp_dim, v.embed_dim * v.merge_unit
    h, i, hd = t.hidden_size, t.intermediate_size, t.head_dim
    nl, kl = v.depth, t.num_layers
    shapes: Params = {
        "visual": {
            "patch_embed": {"proj": {"kernel": (v.patch_dim, e)}},
            "blocks": {
                "norm1": {"weight": (nl, e), "bias": (nl, e)},
                "norm2": {"weight": (nl, e), "bias": (nl, e)},
                "attn": {
                    "qkv": {"kernel": (nl, e, 3 * e), "bias": (nl, 3 * e)},
                    "proj": {"kernel": (nl, e, e), "bias": (nl, e)},
                },
                "mlp": {
                    "fc1": {"kernel": (nl, e, m), "bias": (nl, m)},
                    "fc2": {"kernel": (nl, m, e), "bias": (nl, e)},
                },
            },
            "merger": {
                "ln_q": {"weight": (e,), "bias": (e,)},
                "mlp": {
                    "0": {"kernel": (merged, merged), "bias": (merged,)},
                    "2": {"kernel": (merged, v.out_hidden_size), "bias": (v.out_hidden_size,)},
                },
            },
        },
        "model": {
            "embed_tokens": {"embedding": (t.vocab_size, h)},
            "layers": {
                "input_layernorm": {"weight": (kl, h)},
                "post_attention_layernorm": {"weight": (kl, h)},
                "self_attn": {
                    "q_proj": {"kernel": (kl, h, t.num_heads * hd), "bias": (kl, t.num_heads * hd)},
                    "k_proj": {"kernel": (kl, h, t.num_kv_heads * hd), "bias": (kl, t.num_kv_heads * hd)},
                    "v_proj": {"kernel": (kl, h, t.num_kv_heads * hd), "bias": (kl, t.num_kv_heads * hd)},
                    "o_proj": {"kernel": (kl, t.num_heads * hd, h)},
                },
                "mlp": {
                    "gate_proj": {"kernel": (kl, h, i)},
                    "up_proj": {"kernel": (kl, h, i)},
                    "down_proj": {"kernel": (kl, i, h)},
                },
            },
            "norm": {"weight": (h,)},
        },
    }
    if not t.tie_word_embeddings:
        shapes["lm_head"] = {"kernel": (h, t.vocab_size)}
    return shapes


def abstract_params(cfg: ModelConfig, dtype: Any = "float32") -> Params:
    """`jax.ShapeDtypeStruct` leaves for the tree (no memory)."""
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), param_shapes(cfg), is_leaf=is_shape)


def init_params(cfg: ModelConfig, seed: int = 0, dtype: Any = "float32", std: float = 0.02) -> Params:
    """Random parameters (numpy on the host): normal(std) weights, unit norm weights, zero biases."""
    dtype = np.dtype(jnp.dtype(dtype))
    rng = np.random.default_rng(seed)

    def make(path, shape):
        name = path[-1].key
        parent = path[-2].key if len(path) > 1 else ""
        if name == "bias":
            return np.zeros(shape, dtype)
        if name == "weight" and ("norm" in parent or parent in ("ln_q",)):
            return np.ones(shape, dtype)
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(dtype)

    return jax.tree_util.tree_map_with_path(make, param_shapes(cfg), is_leaf=is_shape)


def is_shape(x: Any) -> bool:
    """A shape tuple: the leaves of `param_shapes` trees."""
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def flatten_tree(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """{("visual", "blocks", ...): leaf} for a nested dict; anything not a Mapping is a leaf."""
    flat: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        path = prefix + (str(key),)
        if isinstance(value, Mapping):
            flat.update(flatten_tree(value, path))
        else:
            flat[path] = value
    return flat


def unflatten_tree(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    """The nested dict of a `flatten_tree` result."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree
