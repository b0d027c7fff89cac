"""GPU check of the cuDNN attention path against the XLA path on the 2B embedder, plus encode speed.

    python benchmarks/attention_gpu.py [--items=32] [--repeats=5]

The tests run on CPU, where `attention_impl="cudnn"` cannot run; this checks it
where it does. Random 2B weights (nothing downloaded), a batch of text-only and
text+image items of very different lengths (heavy left padding, padding
tiles in the vision rows), the embedder forward with cuDNN attention in bf16
against XLA attention in bf16 and in float32. Prints JSON lines: agreement
(cosine of the embeddings, any non-finite value) and forward throughput.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def make_items(count: int, seed: int = 0) -> list[dict]:
    from train_step import WORDS

    rng = np.random.default_rng(seed)
    items = []
    for i in range(count):
        text = " ".join(rng.choice(WORDS, int(rng.integers(5, 400))))
        if i % 3 == 0:
            items.append({"text": text})
        else:
            size = int(rng.choice([224, 336, 448]))
            items.append({"text": "<|IMAGE|> " + text, "image": rng.integers(0, 256, (size, size, 3), np.uint8)})
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="2b", help="2b, or tiny for a dry run on a CPU (no cuDNN variant)")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    from train_step import model_config, random_params_on_device

    from unite_jax.data import media, tiny_tokenizer
    from unite_jax.data.items import prepare_item
    from unite_jax.data.packing import BATCH_KEYS, choose_shapes, pack_batch
    from unite_jax.data.tokenize import PromptTokenizer
    from unite_jax.model.embedder import embed
    from unite_jax.model.options import RunOptions

    directory = tempfile.mkdtemp(prefix="unite_attention_gpu_")
    tiny_tokenizer.build(directory)
    tokenizer = PromptTokenizer.from_pretrained(directory)
    processor = media.ProcessorConfig()
    prepared = [prepare_item(item, i, tokenizer, processor, 2048) for i, item in enumerate(make_items(args.items))]
    seq, budget, block = choose_shapes(prepared, 1, len(prepared))
    packed = pack_batch(prepared, num_shards=1, rows_per_shard=len(prepared), seq_len=seq, patch_budget=budget,
                        pad_id=tokenizer.pad_id, patch_dim=1176, vision_block=block)
    batch = {key: jnp.asarray(packed[key]) for key in BATCH_KEYS}
    lengths = [p.num_tokens for p in prepared]
    emit({"bench": "env", "jax": jax.__version__, "device": jax.devices()[0].device_kind, "items": len(prepared),
          "seq_bucket": seq, "min_tokens": min(lengths), "max_tokens": max(lengths), "patch_budget": budget,
          "vision_block": block, "real_patches": int(sum(p.num_patches for p in prepared))})

    results = {}
    params_bf16 = None
    variants = [("cudnn_bf16", "bfloat16", "cudnn"), ("xla_bf16", "bfloat16", "xla"), ("xla_f32", "float32", "xla")]
    if jax.default_backend() != "gpu":
        variants[0] = ("cudnn_bf16", "bfloat16", "xla")  # dry run: the same code path, XLA attention
    for name, dtype, impl in variants:
        cfg = model_config(args.model)
        run = RunOptions(compute_dtype=dtype, param_dtype=dtype, attention_impl=impl, vision_block=block)
        if dtype == "bfloat16":
            params_bf16 = params_bf16 or random_params_on_device(cfg, dtype, None)
            params = params_bf16
        else:
            params = jax.tree.map(lambda x: x.astype(jnp.float32), params_bf16)
        forward = jax.jit(lambda p, b, cfg=cfg, run=run: embed(p, b, cfg, run))
        start = time.perf_counter()
        vectors = np.asarray(jax.block_until_ready(forward(params, batch)), np.float32)
        compile_s = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            jax.block_until_ready(forward(params, batch))
            times.append(time.perf_counter() - start)
        results[name] = vectors
        forward_s = float(np.median(times))
        emit({"bench": "forward", "variant": name, "forward_s": forward_s, "items_per_s": len(prepared) / forward_s,
              "tokens_per_s": sum(lengths) / forward_s, "compile_s": compile_s,
              "finite": bool(np.isfinite(vectors).all())})
        del params
    reference = results["xla_f32"]
    for name in ("cudnn_bf16", "xla_bf16"):
        cosine = np.sum(results[name] * reference, axis=-1)
        emit({"bench": "agreement", "variant": name, "vs": "xla_f32", "min_cosine": float(cosine.min()),
              "mean_cosine": float(cosine.mean())})
    cosine = np.sum(results["cudnn_bf16"] * results["xla_bf16"], axis=-1)
    emit({"bench": "agreement", "variant": "cudnn_bf16", "vs": "xla_bf16", "min_cosine": float(cosine.min()),
          "max_abs_diff": float(np.abs(results["cudnn_bf16"] - results["xla_bf16"]).max())})


if __name__ == "__main__":
    main()
