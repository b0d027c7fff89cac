"""Qwen2 decoder (the LLM of Qwen2-VL): GQA with q/k/v bias, RMSNorm, SwiGLU, M-RoPE.

LoRA (model/lora.py): with `run.lora` set, a linear whose parameter dict carries
`lora_a`/`lora_b` adds its LoRA branch, scaled by `run.lora.scale`. Given an `rng`,
LoRA dropout (`run.lora.dropout`) draws its masks from one key per decoder layer
(split(rng, num_layers)[layer]) and, inside a layer, one key per linear
(split(layer_key, 7)[LORA_TARGETS.index(name)]), so each linear has its own mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unite_jax.model.attention import attention, padding_segment_ids
from unite_jax.model.config import ModelConfig
from unite_jax.model.layers import linear, rms_norm, scan_layers
from unite_jax.model.lora import LORA_TARGETS
from unite_jax.model.options import RunOptions
from unite_jax.model.rope import apply_rope, text_rope
from unite_jax.model.sharding import constrain_batch


def decoder_layer(x: jnp.ndarray, p: dict, cos: jnp.ndarray, sin: jnp.ndarray, segment_ids: jnp.ndarray,
                  cfg: ModelConfig, run: RunOptions, rng=None) -> jnp.ndarray:
    """One pre-norm decoder layer. x: [batch, seq, hidden]; segment_ids: [batch, seq] (-1 = padding);
    rng: this layer's LoRA-dropout key or None."""
    t = cfg.text
    dtype = x.dtype
    b, s, _ = x.shape
    keys = jax.random.split(rng, len(LORA_TARGETS)) if rng is not None else None

    def proj(h, layer, name):
        return linear(h, layer[name], dtype, lora=run.lora,
                      rng=None if keys is None else keys[LORA_TARGETS.index(name)])

    h = rms_norm(x, p["input_layernorm"]["weight"], t.rms_norm_eps)
    a = p["self_attn"]
    q = proj(h, a, "q_proj").reshape(b, s, t.num_heads, t.head_dim)
    k = proj(h, a, "k_proj").reshape(b, s, t.num_kv_heads, t.head_dim)
    v = proj(h, a, "v_proj").reshape(b, s, t.num_kv_heads, t.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    attn = attention(q, k, v, segment_ids, causal=True, impl=run.attention_impl)
    attn = attn.reshape(b, s, t.num_heads * t.head_dim)
    x = x + proj(attn, a, "o_proj")
    h = rms_norm(x, p["post_attention_layernorm"]["weight"], t.rms_norm_eps)
    m = p["mlp"]
    h = jax.nn.silu(proj(h, m, "gate_proj")) * proj(h, m, "up_proj")
    return x + proj(h, m, "down_proj")


def text_model(params: dict, inputs_embeds: jnp.ndarray, attention_mask: jnp.ndarray, position_ids: jnp.ndarray,
               cfg: ModelConfig, run: RunOptions, rng=None) -> jnp.ndarray:
    """Runs the decoder stack and the final RMSNorm.

    params: the `model` subtree (layers stacked on axis 0, norm; optionally LoRA leaves, see lora.py)
    inputs_embeds: [batch, seq, hidden]; attention_mask: [batch, seq] (0 = left pad)
    position_ids: [batch, 3, seq] int32 (temporal, height, width sections)
    rng: PRNG key for LoRA dropout, or None (deterministic: no dropout)
    Returns the normalised hidden states [batch, seq, hidden] in the compute dtype.
    """
    t = cfg.text
    x = inputs_embeds.astype(jnp.dtype(run.compute_dtype))
    cos, sin = text_rope(position_ids, t.head_dim, t.rope_theta, t.mrope_section)
    segment_ids = padding_segment_ids(attention_mask)
    # One key per layer, scanned together with the stacked layer params (None scans as an empty tree).
    num_layers = jax.tree.leaves(params["layers"])[0].shape[0]
    layer_keys = None if rng is None else jax.random.split(rng, num_layers)

    def body(carry, layer):
        layer_params, layer_key = layer
        # the carry stays split over the batch axes (model/sharding.py): FSDP gathers weights, not rows
        out = decoder_layer(constrain_batch(carry), layer_params, cos, sin, segment_ids, cfg, run, rng=layer_key)
        return constrain_batch(out)

    x = scan_layers(body, constrain_batch(x), (params["layers"], layer_keys), remat=run.remat,
                    use_scan=run.scan_layers)
    return rms_norm(x, params["norm"]["weight"], t.rms_norm_eps)
