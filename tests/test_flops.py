"""The analytic model flops (train/flops.py) against XLA's own count of an unrolled forward pass.

With `scan_layers=False` there is no loop for XLA's cost analysis to count once, so its figure for the
embedding forward is the real one; matmuls dominate at these widths, and the analytic count (matmuls
and attention only) must come within 10% below it (XLA also counts norms, activations, rotary)."""

import jax

from unite_jax.data.batch_shapes import batch_shapes
from unite_jax.data.spec import BatchSpec
from unite_jax.model.config import TextConfig, VisionConfig, preset
from unite_jax.model.embedder import embed
from unite_jax.model.options import RunOptions
from unite_jax.model.params import abstract_params
from unite_jax.train.flops import forward_flops


def test_forward_flops_match_xla_cost_analysis_of_an_unrolled_forward():
    run = RunOptions(scan_layers=False, vision_block=64)
    cfg = preset("tiny").replace(
        vision=VisionConfig(depth=2, embed_dim=256, num_heads=4, mlp_ratio=4.0, out_hidden_size=512),
        text=TextConfig(vocab_size=1024, hidden_size=512, intermediate_size=1536, num_layers=2, num_heads=8,
                        num_kv_heads=2, mrope_section=(8, 12, 12)))
    spec = BatchSpec(num_chunks=1, local_shards=1, rows_per_shard=4, seq_len=128, patches_per_row=128,
                     vision_block=64, hard_negatives=False, max_text_tokens=None, pad_id=0,
                     patch_dim=cfg.vision.patch_dim, patch_dtype="float32")
    query = batch_shapes(spec)["query"]
    # one stream's arrays without the chunk axis: what `embed` takes
    batch = {key: jax.ShapeDtypeStruct(shape[1:], dtype) for key, (shape, dtype) in query.items()}
    compiled = jax.jit(lambda p, b: embed(p, b, cfg, run)).lower(abstract_params(cfg), batch).compile()
    cost = compiled.cost_analysis()
    xla = float((cost[0] if isinstance(cost, list) else cost)["flops"])
    text, vision = forward_flops(cfg, spec)
    ours = (text + vision) / 2  # forward_flops counts every stream of the batch (query and candidate)
    print(f"analytic {ours:.4e} vs XLA {xla:.4e} ({ours / xla:.3f})")
    assert 0.9 * xla <= ours <= xla, f"analytic {ours:.4e} vs XLA {xla:.4e} ({ours / xla:.3f})"
