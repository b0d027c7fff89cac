"""Model flops of one training step, counted from the architecture and the batch shapes.

XLA's cost analysis counts the body of a loop once, and every layer of this
model runs inside a `lax.scan` (and GradCache chunks inside another loop), so
the compiler's figure for a step is closer to one layer's than to the step's.
This count is the usual "model flops" of MFU: the matmuls of every linear and
of attention, in the passes the step really runs.

Passes, per part of the model:
- LLM: forward, backward to the activations (1x forward), backward to the
  weights (1x, only when the weights train: lora.rank = 0; LoRA's own matmuls
  are negligible), one more forward with remat;
- vision tower: forward only with LoRA (it is frozen and nothing before it
  trains, so no gradient flows through it); like the LLM with lora.rank = 0;
- GradCache (chunks > 1): one more forward of everything (the pass that
  computes the embeddings before the loss).
Text attention is causal (half of the dense products); vision attention is
dense inside each tile of `vision_block` patches.
"""

from __future__ import annotations

from unite_jax.data.batch_shapes import batch_shapes
from unite_jax.model.config import ModelConfig


def forward_flops(cfg: ModelConfig, spec) -> tuple[float, float]:
    """(LLM, vision tower) matmul flops of one forward pass over every stream of the batch `spec` describes."""
    t, v = cfg.text, cfg.vision
    text_linear = t.num_layers * (t.hidden_size * (t.num_heads + 2 * t.num_kv_heads) * t.head_dim
                                  + t.num_heads * t.head_dim * t.hidden_size + 3 * t.hidden_size * t.intermediate_size)
    vision_linear = (v.patch_dim * v.embed_dim + v.depth * (4 * v.embed_dim**2 + 2 * v.embed_dim * v.mlp_dim)
                     + (v.merge_unit * v.embed_dim * (v.merge_unit * v.embed_dim + t.hidden_size)) / v.merge_unit)
    text = vision = 0.0
    for shapes in batch_shapes(spec).values():
        if not isinstance(shapes, dict):  # per-example fields (modality, valid)
            continue
        chunks, rows, seq = shapes["input_ids"][0]
        causal_attention = t.num_layers * chunks * rows * 2 * seq**2 * t.num_heads * t.head_dim
        text += 2 * chunks * rows * seq * text_linear + causal_attention
        _, shards, budget, _ = shapes["patches"][0]
        patches = chunks * shards * budget
        vision += 2 * patches * vision_linear + v.depth * 4 * patches * spec.vision_block * v.num_heads * v.head_dim
    return text, vision


def step_flops(cfg: ModelConfig, spec, *, trains_weights: bool, remat: bool) -> float:
    """Flops of one training step over the batch that `spec` (a pipeline.BatchSpec) describes."""
    text, vision = forward_flops(cfg, spec)
    text_passes = 2 + (1 if trains_weights else 0) + (1 if remat else 0)
    vision_passes = (3 + (1 if remat else 0)) if trains_weights else 1
    extra = 1 if spec.num_chunks > 1 else 0  # GradCache's embedding pass
    return text * (text_passes + extra) + vision * (vision_passes + extra)
