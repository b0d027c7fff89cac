"""Qwen2 decoder (the LLM of Qwen2-VL): GQA with q/k/v bias, RMSNorm, SwiGLU, M-RoPE."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unite_jax.model.attention import causal_padding_mask, dot_product_attention
from unite_jax.model.config import ModelConfig
from unite_jax.model.layers import linear, rms_norm, scan_layers
from unite_jax.model.rope import apply_rope, text_rope


def decoder_layer(x: jnp.ndarray, p: dict, cos: jnp.ndarray, sin: jnp.ndarray, mask: jnp.ndarray,
                  cfg: ModelConfig) -> jnp.ndarray:
    """One pre-norm decoder layer. x: [batch, seq, hidden]."""
    t = cfg.text
    dtype = x.dtype
    b, s, _ = x.shape
    h = rms_norm(x, p["input_layernorm"]["weight"], t.rms_norm_eps)
    a = p["self_attn"]
    q = linear(h, a["q_proj"], dtype).reshape(b, s, t.num_heads, t.head_dim)
    k = linear(h, a["k_proj"], dtype).reshape(b, s, t.num_kv_heads, t.head_dim)
    v = linear(h, a["v_proj"], dtype).reshape(b, s, t.num_kv_heads, t.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    attn = dot_product_attention(q, k, v, mask, impl=cfg.attention_impl).reshape(b, s, t.num_heads * t.head_dim)
    x = x + linear(attn, a["o_proj"], dtype)
    h = rms_norm(x, p["post_attention_layernorm"]["weight"], t.rms_norm_eps)
    m = p["mlp"]
    h = jax.nn.silu(linear(h, m["gate_proj"], dtype)) * linear(h, m["up_proj"], dtype)
    return x + linear(h, m["down_proj"], dtype)


def text_model(params: dict, inputs_embeds: jnp.ndarray, attention_mask: jnp.ndarray, position_ids: jnp.ndarray,
               cfg: ModelConfig) -> jnp.ndarray:
    """Runs the decoder stack and the final RMSNorm.

    params: the `model` subtree (layers stacked on axis 0, norm)
    inputs_embeds: [batch, seq, hidden]; attention_mask: [batch, seq] (0 = left pad)
    position_ids: [batch, 3, seq] int32 (temporal, height, width sections)
    Returns the normalised hidden states [batch, seq, hidden] in the compute dtype.
    """
    t = cfg.text
    x = inputs_embeds.astype(jnp.dtype(cfg.compute_dtype))
    cos, sin = text_rope(position_ids, t.head_dim, t.rope_theta, t.mrope_section)
    mask = causal_padding_mask(attention_mask)

    def body(carry, layer_params):
        return decoder_layer(carry, layer_params, cos, sin, mask, cfg)

    x = scan_layers(body, x, params["layers"], remat=cfg.remat, use_scan=cfg.scan_layers)
    return rms_norm(x, params["norm"]["weight"], t.rms_norm_eps)
