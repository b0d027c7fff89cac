"""Embedder speed: JAX vs transformers (PyTorch) on the same CPU, in the same run.

    python benchmarks/embed.py [--batch=8] [--items=32] [--repeats=5] [--skip_2b]

Each framework runs in its own worker process on identical inputs (the same
saved model, the same tokenised items and pixels), so neither one's thread
pool competes with the other's. Prints JSON lines:
- `forward`: encode throughput (items/s, tokens/s) of the jitted embedder vs the
  UNITE reference forward in transformers, and the speed ratio (> 1: JAX faster);
- `train_step`: forward+backward of an InfoNCE step over the batch w.r.t. all
  parameters, both frameworks;
- `encode_e2e`: `Embedder.encode` items/s including pre-processing;
- `2b_shape`: compile time and XLA's memory analysis of the real 2B shape in bf16
  (abstract weights, nothing allocated).
Timings are medians over repeats after a warm-up; compile time is reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

MID = dict(hidden=512, layers=8, heads=8, kv=2, inter=1408, v_embed=256, v_depth=4, v_heads=4)


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def write_mid_model(directory: str) -> None:
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from unite_jax.data import media, tiny_tokenizer

    ids = tiny_tokenizer.SPECIAL_TOKEN_IDS
    m = MID
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=tiny_tokenizer.VOCAB_SIZE, hidden_size=m["hidden"], intermediate_size=m["inter"],
                         num_hidden_layers=m["layers"], num_attention_heads=m["heads"], num_key_value_heads=m["kv"],
                         rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
                         bos_token_id=0, eos_token_id=2, pad_token_id=0),
        vision_config=dict(depth=m["v_depth"], embed_dim=m["v_embed"], hidden_size=m["hidden"], num_heads=m["v_heads"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration._from_config(config, dtype=torch.float32).save_pretrained(directory)
    tiny_tokenizer.build(directory)
    media.ProcessorConfig(min_pixels=64 * 28 * 28, max_pixels=256 * 28 * 28).save_pretrained(directory)


def make_items(n: int, seed: int = 0) -> list[dict]:
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    items = []
    for i in range(n):
        h0, w0 = rng.integers(0, 40, 2)
        items.append({"text": f"<|IMAGE|> find the photo number {i} of the astronaut coffee rocket",
                      "image": photos[i % len(photos)][h0:h0 + 280, w0:w0 + 280]})
    return items


def prepared_items(model_dir: str, n: int):
    """The items tokenised and pre-processed by the library (host side only, no JAX compute)."""
    from unite_jax.data import media
    from unite_jax.data.items import prepare_item
    from unite_jax.data.tokenize import PromptTokenizer

    tokenizer = PromptTokenizer.from_pretrained(model_dir)
    processor = media.ProcessorConfig.from_pretrained(model_dir)
    return [prepare_item(item, i, tokenizer, processor) for i, item in enumerate(make_items(n))]


def info_nce(e, log_softmax, diagonal):
    half = e.shape[0] // 2
    return -diagonal(log_softmax(e[:half] @ e[half:].T / 0.03)).mean()


# ----------------------------------------------------------------------------- workers
def torch_worker(args) -> None:
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    torch.set_num_threads(os.cpu_count() or 1)
    model = Qwen2VLForConditionalGeneration.from_pretrained(args.model_dir, dtype=torch.float32,
                                                            attn_implementation="sdpa")
    prepared = prepared_items(args.model_dir, args.batch)
    seq = max(p.num_tokens for p in prepared)
    ids = torch.zeros((len(prepared), seq), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prepared):
        ids[i, seq - p.num_tokens:] = torch.tensor(p.input_ids)
        mask[i, seq - p.num_tokens:] = 1
    pixels = torch.tensor(np.concatenate([x for p in prepared for x in p.patches]))
    grids = torch.tensor([g for p in prepared for g in p.grids])

    def forward():
        embeds = model.model.language_model.embed_tokens(ids)
        features = model.model.visual(pixels, grid_thw=grids).pooler_output
        slots = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        hidden = model.model.language_model(inputs_embeds=embeds.masked_scatter(slots, features),
                                            attention_mask=mask).last_hidden_state[:, -1]
        return torch.nn.functional.normalize(hidden, dim=-1)

    with torch.no_grad():
        vectors = forward()
        forward_s = median_time(forward, args.repeats)

    def step():
        model.zero_grad(set_to_none=True)
        info_nce(forward(), lambda x: torch.log_softmax(x, dim=-1), torch.diagonal).backward()

    step()
    emit({"forward_s": forward_s, "step_s": median_time(step, args.repeats), "tokens": int(mask.sum()),
          "vectors": vectors.numpy().tolist()})


def jax_worker(args) -> None:
    import jax
    import jax.numpy as jnp

    from unite_jax import Embedder
    from unite_jax.data.packing import BATCH_KEYS, choose_shapes, pack_batch
    from unite_jax.model.embedder import embed

    embedder = Embedder.from_pretrained(args.model_dir)
    prepared = prepared_items(args.model_dir, args.batch)
    num_shards = len(embedder.mesh.devices.ravel())
    rows_per_shard = -(-args.batch // num_shards)
    encode_batch = lambda: embedder.encoder.encode_batch(embedder.params, prepared, rows_per_shard).block_until_ready()
    start = time.perf_counter()
    vectors = np.asarray(encode_batch())[: args.batch]
    compile_s = time.perf_counter() - start
    forward_s = median_time(encode_batch, args.repeats)

    seq, budget, block = choose_shapes(prepared, num_shards, rows_per_shard)
    packed = pack_batch(prepared, num_shards=num_shards, rows_per_shard=rows_per_shard, seq_len=seq,
                        patch_budget=budget, pad_id=embedder.tokenizer.pad_id, patch_dim=embedder.cfg.vision.patch_dim,
                        vision_block=block)
    batch = {k: jnp.asarray(packed[k]) for k in BATCH_KEYS}
    cfg, run = embedder.cfg, embedder.run.replace(vision_block=block)
    loss = lambda p: info_nce(embed(p, batch, cfg, run)[: args.batch], lambda x: jax.nn.log_softmax(x, axis=-1),
                              jnp.diagonal)
    grad_fn = jax.jit(jax.value_and_grad(loss))
    start = time.perf_counter()
    jax.block_until_ready(grad_fn(embedder.params))
    step_compile_s = time.perf_counter() - start
    step_s = median_time(lambda: jax.block_until_ready(grad_fn(embedder.params)), args.repeats)

    many = make_items(args.items, seed=1)
    embedder.encode(many, batch_size=args.batch)  # compiles the shapes of this set
    e2e_s = median_time(lambda: embedder.encode(many, batch_size=args.batch), max(1, args.repeats // 2))
    emit({"forward_s": forward_s, "step_s": step_s, "compile_s": compile_s, "step_compile_s": step_compile_s,
          "e2e_items_per_s": args.items / e2e_s, "seq_bucket": seq, "patch_budget": budget, "vision_block": block,
          "vectors": vectors.tolist()})


def bench_2b(args) -> None:
    """Compile time and memory of the 2B forward and fwd+bwd in bf16, from abstract shapes only."""
    import jax
    import jax.numpy as jnp

    from unite_jax.model import params as params_lib
    from unite_jax.model.config import preset
    from unite_jax.model.embedder import embed
    from unite_jax.model.options import RunOptions

    block = 1280 * 28 * 28 // 196  # one frame at UNITE's largest image budget per tile
    for remat in ("none", "full"):
        cfg = preset("2b")
        run = RunOptions(compute_dtype="bfloat16", param_dtype="bfloat16", remat=remat, vision_block=block)
        abstract = params_lib.abstract_params(cfg, run.param_dtype)
        rows, seq, patches = args.batch_2b, 512, args.batch_2b * block
        batch = {
            "input_ids": jax.ShapeDtypeStruct((rows, seq), jnp.int32),
            "attention_mask": jax.ShapeDtypeStruct((rows, seq), jnp.int32),
            "position_ids": jax.ShapeDtypeStruct((rows, 3, seq), jnp.int32),
            "patches": jax.ShapeDtypeStruct((1, patches, cfg.vision.patch_dim), jnp.bfloat16),
            "patch_segment_ids": jax.ShapeDtypeStruct((1, patches), jnp.int32),
            "patch_positions": jax.ShapeDtypeStruct((1, patches, 2), jnp.int32),
            "merged_dest": jax.ShapeDtypeStruct((1, patches // 4), jnp.int32),
        }
        param_bytes = sum(int(np.prod(x.shape)) * 2 for x in jax.tree.leaves(abstract))
        functions = {"fwd_bwd": jax.grad(lambda p, b, cfg=cfg, run=run: jnp.sum(embed(p, b, cfg, run)[:, 0]))}
        if remat == "none":
            functions = {"forward": lambda p, b, cfg=cfg, run=run: embed(p, b, cfg, run), **functions}
        for name, fn in functions.items():
            start = time.perf_counter()
            compiled = jax.jit(fn).lower(abstract, batch).compile()
            compile_s = time.perf_counter() - start
            mem = compiled.memory_analysis()
            emit({"bench": "2b_shape", "fn": name, "remat": remat, "rows": rows, "seq": seq, "patches": patches,
                  "compile_s": round(compile_s, 2), "param_gib": round(param_bytes / 2**30, 3),
                  "temp_gib": round(mem.temp_size_in_bytes / 2**30, 3)})


# ----------------------------------------------------------------------------- driver
def run_worker(kind: str, args, model_dir: str) -> dict:
    command = [sys.executable, __file__, f"--worker={kind}", f"--model_dir={model_dir}", f"--batch={args.batch}",
               f"--items={args.items}", f"--repeats={args.repeats}"]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch_2b", type=int, default=4)
    parser.add_argument("--skip_2b", action="store_true")
    parser.add_argument("--skip_mid", action="store_true")
    parser.add_argument("--worker", choices=("torch", "jax"), help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "torch":
        return torch_worker(args)
    if args.worker == "jax":
        return jax_worker(args)

    import jax

    emit({"bench": "env", "backend": jax.default_backend(), "cpu_count": os.cpu_count(), "jax": jax.__version__})
    if not args.skip_mid:
        model_dir = tempfile.mkdtemp(prefix="unite_bench_")
        write_mid_model(model_dir)
        torch_result = run_worker("torch", args, model_dir)
        jax_result = run_worker("jax", args, model_dir)
        max_diff = float(np.abs(np.asarray(jax_result.pop("vectors")) - np.asarray(torch_result.pop("vectors"))).max())
        tokens = torch_result["tokens"]
        emit({"bench": "forward", "config": MID, "batch": args.batch, "tokens": tokens,
              "jax_s": jax_result["forward_s"], "torch_s": torch_result["forward_s"],
              "jax_items_per_s": args.batch / jax_result["forward_s"],
              "torch_items_per_s": args.batch / torch_result["forward_s"],
              "jax_tokens_per_s": tokens / jax_result["forward_s"],
              "torch_tokens_per_s": tokens / torch_result["forward_s"],
              "speed_ratio_jax_over_torch": torch_result["forward_s"] / jax_result["forward_s"],
              "jax_compile_s": jax_result["compile_s"], "max_abs_diff_vs_torch": max_diff,
              "jax_shapes": [jax_result["seq_bucket"], jax_result["patch_budget"], jax_result["vision_block"]]})
        emit({"bench": "train_step", "config": MID, "batch": args.batch, "jax_s": jax_result["step_s"],
              "torch_s": torch_result["step_s"],
              "speed_ratio_jax_over_torch": torch_result["step_s"] / jax_result["step_s"],
              "jax_compile_s": jax_result["step_compile_s"]})
        emit({"bench": "encode_e2e", "items": args.items, "batch": args.batch,
              "items_per_s": jax_result["e2e_items_per_s"]})
    if not args.skip_2b:
        bench_2b(args)


if __name__ == "__main__":
    main()
