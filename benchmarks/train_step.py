"""Training step time: the library's jitted `train_step` fed by the real input pipeline vs synthetic batches,
and vs a PyTorch reference step (transformers Qwen2-VL + LoRA + the same loss) on the same machine, same run.

    python benchmarks/train_step.py                          # CPU: tiny and mid configs
    python benchmarks/train_step.py --configs=tiny --steps_tiny=10
    python benchmarks/train_step.py --gpu                    # GPU: 2B shapes, random weights, bf16
    python benchmarks/train_step.py --gpu --gpu_quick        # smaller 2B batch, fewer steps
    python benchmarks/train_step.py --gpu --tiny_gpu_shapes  # dry run of the --gpu code path on a CPU

CPU mode, per config ("tiny": the tiny preset; "mid": LLM 512 x 8 layers, vision 256 x 4, as in
benchmarks/embed.py), float32, LoRA r8 alpha 16 on q,k,v,o,gate,up,down, LoRA dropout 0 (with
dropout the two frameworks would draw different masks), stage-1 loss (symmetric InfoNCE, tau 0.03,
no modality mask), AdamW lr 1e-4 with no warmup, grad-norm clip 1.0:
  - a model directory is written from JAX-initialised random weights (`save_hf_params`), with the tiny
    tokenizer and pixel budget; the demo data set (`build_demo_data(scale=0.3)`, stage-1 manifests)
    feeds the pipeline;
  - a JAX worker process builds the trainer's pieces as `unite_jax.train.loop` does (1-D data mesh over
    all local devices, `create_state`, `make_optimizer`, `init_lora`, `train_step` jitted with the
    state donated) and times (a) real: `build_train_iterator` (data.num_workers worker processes) ->
    `prefetch_to_device` -> step, N steps end to end, one host read of the loss per step; (b) synthetic:
    the first real batch, already on the devices, reused every step, from a fresh state;
  - a PyTorch worker process (benchmarks/torch_reference.py) loads the same weights and the same
    LoRA A matrices, and steps on the same examples as the first batch (unpacked: each stream
    left-padded to its longest row, pixel values concatenated with grid_thw), N steps on that batch,
    once with 1 intra-op thread and then (at most 5 timed steps) with one per core
    (--cpu_torch_threads); the ratio uses the faster. On a shared machine PyTorch's thread pool suffers far
    more than XLA's from other processes' load (seen here: 2 threads 10x slower than 1 while another job held a core).
JAX pads every row to data.seq_len and every row's patches to data.patches_per_row (static shapes,
one compilation); PyTorch pads each stream only to its longest row: `jax_nonpad_fraction` and
`torch_nonpad_fraction` say how much of each side's token grid is real.
Both sides run steps on batch 0 from the same start, so their first two losses must agree (float32):
the first checks the forward and loss, the second the gradient and the AdamW update.

Printed JSON lines: {"bench": "env"}, then per config {"bench": "train_step", ...} with
jax_real_step_s / jax_synthetic_step_s (medians of per-step times), real_over_synthetic (the
pipeline is not the bottleneck when <= 1.10), torch_step_s, speed_ratio_torch_over_jax (torch_s /
jax_synthetic_s, > 1: JAX faster), tokens/s (non-pad tokens of both streams, vision tokens
included), the losses and their differences, compile time and the load average around the run.

GPU mode (--gpu): preset 2b shapes with RANDOM weights (nothing is downloaded or read), bf16 params
and compute, remat "full", LoRA r8 (float32 master weights), synthetic batches only, built in memory
from generated images and text with `prepare_item` + `pack_batch` (the pipeline's layout, C = 1); it
imports neither grain, ml_collections, tensorboardX nor av. Reports step time, tokens/s and MFU, then
the PyTorch reference (bf16, sdpa, gradient checkpointing, same LoRA, same inputs, its own random
weights: values differ, shapes and work are the same) and the ratio. MFU counts model flops only
(see `model_flops`): no remat recomputation, no padding.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch_reference  # numpy only at import time (a sibling module: benchmarks/ is on sys.path)

MID = dict(hidden=512, layers=8, heads=8, kv=2, inter=1408, v_embed=256, v_depth=4, v_heads=4)
LORA_RANK, LORA_ALPHA = 8, 16.0
TEMPERATURE = 0.03
LEARNING_RATE = 1e-4
SCHEDULE_STEPS = 10_000  # cosine horizon: the learning rate stays ~1e-4 over the few steps timed
# Peak dense bf16 tensor throughput (no sparsity), FLOP/s: H100 SXM and H200 share the same compute.
PEAK_BF16_FLOPS = {"h100": 989e12, "h200": 989e12}
WORDS = ("a photo of a cat sitting on a red sofa near the window the dog runs across the green park "
         "the quick brown fox jumps over the lazy dog while people walk in the city at night astronaut "
         "coffee rocket camera coins horse brick grass moon text page clock digit moves left right up down").split()


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def summary(times: list[float]) -> dict:
    times = [float(t) for t in times]
    return {"median": float(np.median(times)), "mean": float(np.mean(times)), "min": float(np.min(times)),
            "n": len(times)}


# ----------------------------------------------------------------------------- model configs
def model_config(name: str):
    """ModelConfig of "tiny", "mid" or "2b" (2b with the tiny tokenizer's special ids: no real tokenizer here)."""
    from unite_jax.data import tiny_tokenizer
    from unite_jax.model.config import ModelConfig, TextConfig, VisionConfig, preset

    ids = tiny_tokenizer.SPECIAL_TOKEN_IDS
    token_ids = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                     vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if name == "tiny":
        return preset("tiny")
    if name == "2b":
        return preset("2b").replace(**token_ids)
    if name == "mid":
        m = MID
        return ModelConfig(
            vision=VisionConfig(depth=m["v_depth"], embed_dim=m["v_embed"], num_heads=m["v_heads"],
                                out_hidden_size=m["hidden"]),
            text=TextConfig(vocab_size=tiny_tokenizer.VOCAB_SIZE, hidden_size=m["hidden"],
                            intermediate_size=m["inter"], num_layers=m["layers"], num_heads=m["heads"],
                            num_kv_heads=m["kv"], mrope_section=(8, 12, 12), tie_word_embeddings=True),
            **token_ids)
    raise ValueError(f"--configs: unknown config {name!r}; expected tiny, mid (CPU) or 2b (--gpu)")


def write_model_dir(name: str, directory: str, seed: int = 0) -> None:
    """Random float32 weights of config `name` as a Hugging Face directory + tiny tokenizer + pixel budget."""
    from unite_jax.convert.hf import save_hf_params
    from unite_jax.data import tiny_tokenizer
    from unite_jax.model.params import init_params

    cfg = model_config(name)
    os.makedirs(directory, exist_ok=True)
    save_hf_params(init_params(cfg, seed=seed, std=0.05), cfg, directory)
    tiny_tokenizer.write_assets(directory)


def dims(cfg) -> dict:
    t, v = cfg.text, cfg.vision
    return {"llm": f"{t.hidden_size}x{t.num_layers}", "vision": f"{v.embed_dim}x{v.depth}", "vocab": t.vocab_size}


# ----------------------------------------------------------------------------- the JAX trainer pieces
def lora_run(**options):
    """RunOptions with the benchmark's LoRA (r8, alpha 16, no dropout)."""
    from unite_jax.model import lora as lora_lib
    from unite_jax.model.options import LoraOptions, RunOptions

    return RunOptions(**options, lora=LoraOptions(lora_lib.lora_scale(LORA_ALPHA, LORA_RANK), dropout=0.0))


def trainer(cfg, run, mesh, pixel_table, lora_seed: int = 1):
    """(frozen-param shardings, lora tree placed, make_state, step_fn) built as unite_jax.train.loop does."""
    import jax

    from unite_jax import parallel
    from unite_jax.model import lora as lora_lib
    from unite_jax.train.optim import make_optimizer
    from unite_jax.train.state import create_state
    from unite_jax.train.step import LossSettings, train_step

    lora_shardings = parallel.param_shardings(lora_lib.abstract_lora(cfg, LORA_RANK, dtype="float32"), mesh)
    lora = parallel.place_tree(lora_lib.init_lora(cfg, LORA_RANK, seed_or_key=lora_seed, dtype="float32"),
                               lora_shardings)
    tx, schedule = make_optimizer(LEARNING_RATE, SCHEDULE_STEPS, warmup_fraction=0.0)
    make_state = jax.jit(functools.partial(create_state, tx=tx, seed=0))
    state_shardings = jax.tree.map(lambda x: x.sharding, make_state(lora))
    # stage 1 of the recipe: symmetric InfoNCE, no modality mask
    settings = LossSettings(temperature=TEMPERATURE, modality_mask=False, symmetric=True)
    step_fn = jax.jit(functools.partial(train_step, cfg=cfg, run=run, settings=settings, tx=tx, schedule=schedule,
                                        has_negatives=False, pixel_table=pixel_table),
                      donate_argnums=(0,), out_shardings=(state_shardings, None))
    return lora, (lambda: make_state(lora)), step_fn


def save_lora_a(path: str, lora: dict) -> None:
    """The LoRA A leaves as {"self_attn/q_proj": [layers, in, r], ...} for the PyTorch worker."""
    layers = lora["model"]["layers"]
    np.savez(path, **{f"{module}/{name}": np.asarray(pair["lora_a"], np.float32)
                      for module, names in layers.items() for name, pair in names.items()})


def timed_steps(step_fn, state, frozen, batches, count: int) -> tuple:
    """Runs `count` steps, each on next(batches) -> (device batch, tokens); one host read of the loss per
    step (it waits for that step). Returns (state, per-step seconds, losses, data-wait seconds, tokens)."""
    times, losses, waits, tokens = [], [], [], []
    for _ in range(count):
        start = time.perf_counter()
        batch, n = next(batches)
        waits.append(time.perf_counter() - start)
        state, metrics = step_fn(state, frozen, batch)
        losses.append(float(metrics["loss"]))
        times.append(time.perf_counter() - start)
        tokens.append(n)
    return state, times, losses, waits, tokens


# ----------------------------------------------------------------------------- CPU workers
def jax_cpu_worker(args) -> None:
    import jax

    from unite_jax import parallel
    from unite_jax.convert.hf import load_hf_params
    from unite_jax.data import media
    from unite_jax.data.pipeline import (
        BatchSpec,
        ExampleBuilder,
        PreparedExample,
        build_train_iterator,
        default_data_config,
        index_dataset,
        open_sources,
        pack_examples,
        prefetch_to_device,
    )
    from unite_jax.data.tokenize import PromptTokenizer
    from unite_jax.model.config import ModelConfig
    from unite_jax.model.params import abstract_params

    mesh = parallel.make_mesh((-1, 1, 1))
    cfg = ModelConfig.from_pretrained(args.model_dir)
    run = lora_run(positions="sequential", compute_dtype="float32", param_dtype="float32", attention_impl="xla",
                   remat="none", vision_block=args.vision_block)
    tokenizer = PromptTokenizer.from_pretrained(args.model_dir)
    processor = media.ProcessorConfig.from_pretrained(args.model_dir)
    frozen = parallel.place_tree(load_hf_params(args.model_dir, cfg),
                                 parallel.param_shardings(abstract_params(cfg), mesh))
    lora, fresh_state, step_fn = trainer(cfg, run, mesh, media.normalize_table(processor))
    save_lora_a(os.path.join(args.work_dir, "lora_a.npz"), lora)

    data_cfg = default_data_config()
    data_cfg.train = args.data
    data_cfg.num_workers = args.num_workers
    data_cfg.seq_len, data_cfg.patches_per_row, data_cfg.vision_block = args.seq_len, args.patches_per_row, \
        args.vision_block
    shards = parallel.num_batch_shards(mesh)
    if args.batch % shards:
        raise ValueError(f"--batch_{args.config}={args.batch} must be a multiple of the {shards} devices")
    spec = BatchSpec.from_config(data_cfg, num_chunks=1, local_shards=parallel.local_batch_shards(mesh),
                                 rows_per_shard=args.batch // shards, pad_id=tokenizer.pad_id,
                                 patch_dim=cfg.vision.patch_dim, merge_size=cfg.vision.spatial_merge_size,
                                 position_mode=run.positions)
    children_cpu = _children_cpu_s()
    iterator = build_train_iterator(data_cfg, spec, tokenizer, processor, seed=0, process_index=0, process_count=1)
    put = functools.partial(parallel.host_to_global, mesh=mesh, batch_axis=1)
    prefetcher = prefetch_to_device(iterator, put, size=2)

    # ---- (a) real batches: compile on batch 0, warm up, then N steps through the pipeline
    start = time.perf_counter()
    batch0, host0, _ = next(prefetcher)
    first_batch_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = step_fn.lower(fresh_state(), frozen, batch0).compile()
    compile_s = time.perf_counter() - start

    def real_batches():
        while True:
            device_batch, host_batch, _ = next(prefetcher)
            yield device_batch, host_batch.num_tokens

    state, _, real_first_loss, _, _ = timed_steps(compiled, fresh_state(), frozen,
                                                  iter([(batch0, host0.num_tokens)]), 1)
    real = real_batches()
    state, _, _, _, _ = timed_steps(compiled, state, frozen, real, args.warmup)
    state, real_times, _, real_waits, real_tokens = timed_steps(compiled, state, frozen, real, args.steps)
    jax.block_until_ready(state)
    prefetcher.close()
    iterator.close()
    # CPU time of the pipeline's worker processes (counted once they have exited), per batch consumed;
    # the few batches they prepared ahead and nobody used make it a slight overestimate
    consumed = 1 + args.warmup + args.steps
    worker_cpu = (_children_cpu_s() - children_cpu) / consumed if args.num_workers else None

    # ---- (b) synthetic: batch 0 (already on the devices) every step, from a fresh state
    def same_batch():
        while True:
            yield batch0, host0.num_tokens

    synthetic = same_batch()
    state, _, synthetic_losses, _, _ = timed_steps(compiled, fresh_state(), frozen, synthetic, args.warmup)
    state, synthetic_times, more_losses, _, _ = timed_steps(compiled, state, frozen, synthetic, args.steps)
    synthetic_losses += more_losses

    # ---- batch 0's examples, unpacked, for the PyTorch worker. Re-built from the record order the
    # pipeline uses (one worker's slice of the shuffled index stream) and checked against the batch.
    sources, weights = open_sources(data_cfg)
    index_ds = index_dataset([len(s) for s in sources], weights, seed=0, shuffle=bool(data_cfg.shuffle),
                             process_index=0, process_count=1, names=[s.name for s in sources])
    builder = ExampleBuilder(tokenizer, processor, spec)
    stride = max(1, int(args.num_workers))  # mp_prefetch gives worker 0 every stride-th index; batch 0 is its
    examples = [builder.build(sources[k], r) for k, r in (index_ds[i * stride] for i in range(args.batch))]
    if not all(isinstance(e, PreparedExample) for e in examples) or \
            [e.where for e in examples] != list(host0.example_wheres):
        rebuilt = [getattr(e, "where", e) for e in examples][:4]
        raise RuntimeError(f"could not re-build batch 0 for the PyTorch worker: pipeline records "
                           f"{list(host0.example_wheres)[:4]}..., re-built {rebuilt}...")
    repacked, _ = pack_examples(examples, spec)
    mismatched = [f"{stream}/{key}" for stream in ("query", "candidate") for key in repacked[stream]
                  if not np.array_equal(repacked[stream][key], host0.arrays[stream][key])]
    if mismatched:
        raise RuntimeError(f"re-built batch 0 differs from the pipeline's batch 0 in {mismatched}")
    torch_reference.save_streams(os.path.join(args.work_dir, "inputs.npz"),
                                 {s: [getattr(e, s) for e in examples] for s in ("query", "candidate")})
    modality = np.bincount(np.asarray(host0.arrays["candidate_modality"]).ravel(), minlength=8)
    emit({"config": dims(cfg), "devices": len(mesh.devices.ravel()), "compile_s": compile_s,
          "first_batch_s": first_batch_s, "worker_cpu_s_per_batch": worker_cpu, "real_times": real_times,
          "real_waits": real_waits,
          "real_tokens": real_tokens, "synthetic_times": synthetic_times, "tokens_batch0": host0.num_tokens,
          "real_first_loss": real_first_loss[0], "synthetic_losses": synthetic_losses,
          "batch0_candidate_modalities": {"text": int(modality[1]), "image": int(modality[2]),
                                          "video": int(modality[4])},
          "pad_id": tokenizer.pad_id})


def _children_cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def torch_worker(args) -> None:
    device = args.torch_device or "cpu"
    if args.torch_device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    result = torch_reference.run_reference(
        args.model_dir, os.path.join(args.work_dir, "inputs.npz"), os.path.join(args.work_dir, "lora_a.npz"),
        steps=args.steps, warmup=args.warmup, dtype=args.torch_dtype, device=device,
        checkpointing=args.torch_checkpointing, random_init=args.torch_random_init,
        lora_scale=LORA_ALPHA / LORA_RANK, temperature=TEMPERATURE, learning_rate=LEARNING_RATE,
        pad_id=args.pad_id, threads=tuple(int(t) for t in args.torch_threads.split(",") if t.strip()))
    result["device"] = device
    if device.startswith("cuda"):
        import torch

        result["device"] = torch.cuda.get_device_name()
    emit(result)


# ----------------------------------------------------------------------------- GPU mode
def random_params_on_device(cfg, dtype, shardings, seed: int = 0, std: float = 0.02):
    """Random parameters made on the devices (the 2B tree in seconds, no host copy), in `dtype`,
    with init_params's rules: normal(std) weights, unit norm weights, zero biases."""
    import jax
    import jax.numpy as jnp

    from unite_jax.model.params import param_shapes

    def is_shape(x) -> bool:
        return isinstance(x, tuple) and all(isinstance(d, int) for d in x)
    flat, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(cfg), is_leaf=is_shape)
    dtype = jnp.dtype(dtype)

    def make(key):
        keys = jax.random.split(key, len(flat))
        leaves = []
        for (path, shape), k in zip(flat, keys):
            name = path[-1].key
            parent = path[-2].key if len(path) > 1 else ""
            if name == "bias":
                leaves.append(jnp.zeros(shape, dtype))
            elif name == "weight" and ("norm" in parent or parent == "ln_q"):
                leaves.append(jnp.ones(shape, dtype))
            else:
                leaves.append((jax.random.normal(k, shape, jnp.float32) * std).astype(dtype))
        return jax.tree_util.tree_unflatten(treedef, leaves)

    return jax.jit(make, out_shardings=shardings)(jax.random.key(seed))


def synthetic_items(count: int, image_size: int, seed: int, words: int = 4000) -> list[dict]:
    """`count` items of one random image (image_size^2) and a long caption of known words."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(count):
        image = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
        text = " ".join(rng.choice(WORDS, words))
        items.append({"text": text, "image": image})
    return items


def prepare_stream(items, seq_len: int, tokenizer, processor) -> list:
    """prepare_item with the text cut so that each row fills ~seq_len tokens (the vision block is never cut)."""
    from unite_jax.data.items import prepare_item

    probe = prepare_item({"text": "a", "image": items[0]["image"]}, 0, tokenizer, processor, max_text_tokens=1)
    overhead = probe.num_tokens - 1  # template + vision tokens
    budget = seq_len - overhead - 4
    if budget < 1:
        raise ValueError(f"--gpu_seq={seq_len} leaves no room for text next to {overhead} template/vision tokens")
    out = []
    for i, item in enumerate(items):
        packable = prepare_item(item, i, tokenizer, processor, max_text_tokens=budget)
        if packable.num_tokens > seq_len:
            raise ValueError(f"item {i}: {packable.num_tokens} tokens > --gpu_seq={seq_len}")
        out.append(packable)
    return out


def pack_stream(items, *, num_shards: int, rows_per_shard: int, seq_len: int, patches_per_row: int,
                vision_block: int, pad_id: int, cfg, positions: str = "sequential") -> dict:
    """One stream in the pipeline's layout with C = 1 (pipeline.pack_examples without its grain import)."""
    from unite_jax.data.packing import BATCH_KEYS, pack_batch

    packed = pack_batch(items, num_shards=num_shards, rows_per_shard=rows_per_shard, seq_len=seq_len,
                        patch_budget=rows_per_shard * patches_per_row, pad_id=pad_id,
                        patch_dim=cfg.vision.patch_dim, merge_size=cfg.vision.spatial_merge_size,
                        position_mode=positions, vision_block=vision_block, share_tiles=False)
    return {key: packed[key][None] for key in BATCH_KEYS}


def model_flops(cfg, row_lengths: list[int], segment_patches: list[int]) -> dict:
    """Model FLOPs of one LoRA training step (matmul multiply-adds x 2), split by part.

    row_lengths: non-pad tokens of every row of both streams (vision tokens included);
    segment_patches: patches of every vision attention segment (one per image / temporal slice).
    - LLM linears (N = q,k,v,o,gate,up,down weights of all layers; embeddings are a lookup): forward
      2 N per token, activation gradients 2 N per token (the frozen base still passes gradients down);
      no weight gradients for the frozen base; LoRA (r x (in + out) per linear) 6 N_lora per token.
    - LLM attention: QK^T and AV, 2 * 2 * len^2 * heads * head_dim per layer and row forward, counted over
      the full len^2 (PaLM's convention; a causal kernel does about half); backward 2x forward (both
      operands are activations).
    - Vision tower and merger: forward only (frozen, and no trainable parameter below them).
    Remat recomputation is not counted (model-FLOPs utilisation), nor padding.
    """
    t, v = cfg.text, cfg.vision
    h, hd, i = t.hidden_size, t.head_dim, t.intermediate_size
    q_out, kv_out = t.num_heads * hd, t.num_kv_heads * hd
    linears = [(h, q_out), (h, kv_out), (h, kv_out), (q_out, h), (h, i), (h, i), (i, h)]
    n_llm = t.num_layers * sum(a * b for a, b in linears)
    n_lora = t.num_layers * sum(LORA_RANK * (a + b) for a, b in linears)
    tokens = int(sum(row_lengths))
    square = float(sum(n * n for n in row_lengths))
    llm_linear = 4.0 * n_llm * tokens
    lora = 6.0 * n_lora * tokens
    llm_attention = 3.0 * t.num_layers * 4.0 * q_out * square
    e, m, merged = v.embed_dim, v.mlp_dim, v.embed_dim * v.merge_unit
    patches = int(sum(segment_patches))
    vision_linear = 2.0 * patches * (v.patch_dim * e + v.depth * (3 * e * e + e * e + 2 * e * m)) \
        + 2.0 * (patches // v.merge_unit) * (merged * merged + merged * v.out_hidden_size)
    vision_attention = v.depth * 4.0 * e * float(sum(n * n for n in segment_patches))
    total = llm_linear + lora + llm_attention + vision_linear + vision_attention
    return {"total": total, "llm_linear": llm_linear, "lora": lora, "llm_attention": llm_attention,
            "vision_linear": vision_linear, "vision_attention": vision_attention, "tokens": tokens,
            "patches": patches, "llm_params_counted": n_llm}


def peak_flops(device_kind: str) -> float | None:
    kind = device_kind.lower()
    for name, value in PEAK_BF16_FLOPS.items():
        if name in kind:
            return value
    return None


def jax_gpu_worker(args) -> None:
    import jax

    from unite_jax import parallel
    from unite_jax.data import media, tiny_tokenizer
    from unite_jax.data.tokenize import PromptTokenizer
    from unite_jax.model.params import abstract_params

    tiny = args.tiny_gpu_shapes
    on_gpu = jax.default_backend() == "gpu"
    attention = args.gpu_attention or ("cudnn" if on_gpu else "xla")
    cfg = model_config("tiny" if tiny else "2b")
    run = lora_run(positions="sequential", compute_dtype="bfloat16", param_dtype="bfloat16",
                   attention_impl=attention, remat="full", vision_block=args.vision_block)
    mesh = parallel.make_mesh((-1, 1, 1))
    shards = parallel.num_batch_shards(mesh)
    if args.batch % shards:
        raise ValueError(f"--gpu_batch={args.batch} must be a multiple of the {shards} devices")
    # assets: the tiny tokenizer (its special ids are in cfg) and a pixel budget that keeps the images' size
    tiny_tokenizer.build(args.work_dir)
    tokenizer = PromptTokenizer.from_pretrained(args.work_dir)
    pixels = args.image_size ** 2
    processor = media.ProcessorConfig(min_pixels=min(pixels, 56 * 56), max_pixels=pixels)
    with open(os.path.join(args.work_dir, "config.json"), "w") as f:  # for the PyTorch worker's random init
        json.dump(cfg.to_hf_dict(), f)

    start = time.perf_counter()
    streams, packed = {}, {}
    for k, stream in enumerate(("query", "candidate")):
        items = synthetic_items(args.batch, args.image_size, seed=k)
        streams[stream] = prepare_stream(items, args.seq_len, tokenizer, processor)
        packed[stream] = pack_stream(streams[stream], num_shards=shards, rows_per_shard=args.batch // shards,
                                     seq_len=args.seq_len, patches_per_row=args.patches_per_row,
                                     vision_block=args.vision_block, pad_id=tokenizer.pad_id, cfg=cfg,
                                     positions=run.positions)
    host_batch = {**packed, "candidate_modality": np.full((1, args.batch), 3, np.int32),  # text+image
                  "valid": np.ones((1, args.batch), bool)}
    batch = parallel.host_to_global(host_batch, mesh, batch_axis=1)
    torch_reference.save_streams(os.path.join(args.work_dir, "inputs.npz"), streams)
    prepare_s = time.perf_counter() - start

    start = time.perf_counter()
    frozen = random_params_on_device(cfg, run.param_dtype,
                                     parallel.param_shardings(abstract_params(cfg, run.param_dtype), mesh))
    lora, fresh_state, step_fn = trainer(cfg, run, mesh, media.normalize_table(processor))
    save_lora_a(os.path.join(args.work_dir, "lora_a.npz"), lora)
    jax.block_until_ready(frozen)
    init_s = time.perf_counter() - start

    start = time.perf_counter()
    compiled = step_fn.lower(fresh_state(), frozen, batch).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()

    def same_batch():
        while True:
            yield batch, 0

    state, _, losses, _, _ = timed_steps(compiled, fresh_state(), frozen, same_batch(), args.warmup)
    state, times, more, _, _ = timed_steps(compiled, state, frozen, same_batch(), args.steps)
    rows = [x.num_tokens for s in streams.values() for x in s]
    segments = [h * w for s in streams.values() for x in s for (t, h, w) in x.grids for _ in range(t)]
    device = jax.devices()[0]
    emit({"device_kind": device.device_kind, "devices": len(mesh.devices.ravel()), "backend": jax.default_backend(),
          "attention_impl": attention, "prepare_s": prepare_s, "init_s": init_s, "compile_s": compile_s,
          "temp_gib": getattr(memory, "temp_size_in_bytes", 0) / 2**30 if memory is not None else None,
          "times": times, "losses": losses + more, "row_lengths": rows, "segment_patches": segments,
          "pad_id": tokenizer.pad_id, "flops": model_flops(cfg, rows, segments), "dims": dims(cfg)})


def gpu_main(args) -> None:
    work_dir = tempfile.mkdtemp(prefix="unite_train_step_gpu_")
    try:
        _gpu_run(args, work_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _gpu_run(args, work_dir: str) -> None:
    # No JAX computation or device query in this process: on a GPU it would claim the memory the workers need.
    import jax

    if args.gpu_quick:
        args.gpu_batch, args.gpu_seq, args.gpu_image, args.gpu_steps, args.gpu_warmup = 16, 512, 336, 5, 1
    if args.tiny_gpu_shapes:
        args.gpu_batch, args.gpu_seq, args.gpu_image, args.gpu_steps, args.gpu_warmup = 8, 128, 112, 2, 1
    patches = (args.gpu_image // 14) ** 2
    common = [f"--work_dir={work_dir}", f"--batch={args.gpu_batch}", f"--seq_len={args.gpu_seq}",
              f"--image_size={args.gpu_image}",
              f"--patches_per_row={patches}", f"--vision_block={patches}", f"--steps={args.gpu_steps}",
              f"--warmup={args.gpu_warmup}"]
    emit({"bench": "env", "mode": "gpu" + (" (dry run: tiny shapes)" if args.tiny_gpu_shapes else ""),
          "jax": jax.__version__, "load_avg": load_average(),
          "batch": args.gpu_batch, "seq": args.gpu_seq, "image": args.gpu_image, "steps": args.gpu_steps,
          "warmup": args.gpu_warmup})
    flags = ["--tiny_gpu_shapes"] if args.tiny_gpu_shapes else []
    if args.gpu_attention:
        flags.append(f"--gpu_attention={args.gpu_attention}")
    try:
        jax_result = run_worker("jax_gpu", common + flags)
    except RuntimeError as e:
        if args.gpu_attention or args.tiny_gpu_shapes:
            raise
        # the default on a GPU is cuDNN attention; XLA's own attention is the fallback that always compiles
        emit({"bench": "train_step_gpu_error", "attention_impl": "default (cudnn)", "error": str(e)[-3000:],
              "retry": "attention_impl=xla"})
        jax_result = run_worker("jax_gpu", common + ["--gpu_attention=xla"])
    step_s = float(np.median(jax_result["times"]))
    flops = jax_result["flops"]
    peak = peak_flops(jax_result["device_kind"])
    record = {"bench": "train_step_gpu", "model": "tiny" if args.tiny_gpu_shapes else "2b",
              "dims": jax_result["dims"], "device": jax_result["device_kind"], "devices": jax_result["devices"],
              "global_batch": args.gpu_batch, "seq": args.gpu_seq, "image": f"{args.gpu_image}x{args.gpu_image}",
              "dtype": "bfloat16", "remat": "full", "lora": f"r{LORA_RANK} alpha{LORA_ALPHA:g} dropout 0",
              "attention_impl": jax_result["attention_impl"], "jax_step_s": step_s,
              "jax_step": summary(jax_result["times"]), "tokens_per_step": flops["tokens"],
              "jax_tokens_per_s": flops["tokens"] / step_s, "model_tflops_per_step": flops["total"] / 1e12,
              "flops_split_tflop": {k: float(f"{v / 1e12:.4g}") for k, v in flops.items()
                                    if k not in ("total", "tokens", "patches", "llm_params_counted")},
              "peak_bf16_tflops": peak / 1e12 if peak else None,
              "jax_mfu": flops["total"] / step_s / peak if peak else None,
              "jax_compile_s": jax_result["compile_s"], "jax_temp_gib": jax_result["temp_gib"],
              "jax_losses": jax_result["losses"], "prepare_s": jax_result["prepare_s"],
              "init_s": jax_result["init_s"]}
    emit({**record, "bench": "train_step_gpu_jax"})
    if args.gpu_skip_torch:
        return
    torch_result = run_worker("torch", [f"--work_dir={work_dir}", f"--model_dir={work_dir}",
                                        f"--steps={args.gpu_steps}", f"--warmup={args.gpu_warmup}",
                                        f"--pad_id={jax_result['pad_id']}", "--torch_dtype=bfloat16",
                                        "--torch_device=auto", "--torch_checkpointing", "--torch_random_init"])
    torch_s = float(np.median(torch_result["step_times"]))
    record.update({"torch_device": torch_result["device"], "torch_step_s": torch_s,
                   "tokens_match": torch_result["tokens"] == flops["tokens"],
                   "torch_nonpad_fraction": torch_result["tokens"] / torch_result["padded_tokens"],
                   "torch_step": summary(torch_result["step_times"]),
                   "torch_tokens_per_s": torch_result["tokens"] / torch_s,
                   "torch_mfu": flops["total"] / torch_s / peak if peak else None,
                   "torch_peak_gib": torch_result["peak_gib"], "torch_load_s": torch_result["load_s"],
                   "torch_losses": torch_result["losses"],
                   "speed_ratio_torch_over_jax": torch_s / step_s,
                   "note": "torch uses its own random weights (same shapes and inputs), so losses differ"})
    emit(record)


# ----------------------------------------------------------------------------- CPU driver
def run_worker(kind: str, extra: list[str]) -> dict:
    command = [sys.executable, os.path.abspath(__file__), f"--worker={kind}", *extra]
    out = subprocess.run(command, check=False, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} worker failed (exit {out.returncode}):\n{out.stderr[-6000:]}")
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{kind} worker printed no JSON line:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def cpu_config(name: str, args, data: str, root: str) -> dict:
    batch, steps = getattr(args, f"batch_{name}"), getattr(args, f"steps_{name}")
    model_dir, work_dir = os.path.join(root, f"model_{name}"), os.path.join(root, f"work_{name}")
    os.makedirs(work_dir, exist_ok=True)
    write_model_dir(name, model_dir)
    load_before = load_average()
    shapes = [f"--seq_len={args.seq_len}", f"--patches_per_row={args.patches_per_row}",
              f"--vision_block={args.vision_block}"]
    jax_result = run_worker("jax_cpu", [f"--config={name}", f"--model_dir={model_dir}", f"--work_dir={work_dir}",
                                        f"--data={data}", f"--batch={batch}", f"--steps={steps}",
                                        f"--warmup={args.warmup}", f"--num_workers={args.num_workers}", *shapes])
    record = {"bench": "train_step", "config": name, "dims": jax_result["config"], "global_batch": batch,
              "seq_len": args.seq_len, "patches_per_row": args.patches_per_row, "devices": jax_result["devices"],
              "dtype": "float32", "lora": f"r{LORA_RANK} alpha{LORA_ALPHA:g} dropout 0 (both sides)",
              "num_workers": args.num_workers, "steps": steps}
    real, synthetic = summary(jax_result["real_times"]), summary(jax_result["synthetic_times"])
    tokens0 = jax_result["tokens_batch0"]
    real_tokens = float(np.mean(jax_result["real_tokens"]))
    record.update({
        "jax_real_step_s": real["median"], "jax_synthetic_step_s": synthetic["median"],
        "real_over_synthetic": real["median"] / synthetic["median"],
        "real_over_synthetic_mean": real["mean"] / synthetic["mean"],
        "pipeline_within_10pct": real["median"] <= 1.10 * synthetic["median"],
        "jax_real": real, "jax_synthetic": synthetic,
        "data_wait_s_per_step": float(np.mean(jax_result["real_waits"])),
        "pipeline_worker_cpu_s_per_batch": jax_result["worker_cpu_s_per_batch"],
        "jax_real_tokens_per_s": real_tokens / real["median"],
        "jax_synthetic_tokens_per_s": tokens0 / synthetic["median"], "tokens_batch0": tokens0,
        "jax_nonpad_fraction": tokens0 / (2 * batch * args.seq_len),
        "batch0_candidates": jax_result["batch0_candidate_modalities"],
        "jax_compile_s": jax_result["compile_s"], "jax_first_batch_s": jax_result["first_batch_s"]})
    losses = jax_result["synthetic_losses"]
    if not args.skip_torch:
        torch_result = run_worker("torch", [f"--model_dir={model_dir}", f"--work_dir={work_dir}",
                                            f"--steps={steps}", f"--warmup={max(1, args.warmup)}",
                                            f"--pad_id={jax_result['pad_id']}", "--torch_dtype=float32",
                                            "--torch_device=cpu", f"--torch_threads={args.cpu_torch_threads}"])
        by_threads = {n: summary(times) for n, times in torch_result["by_threads"].items()}
        best = min(by_threads, key=lambda n: by_threads[n]["median"])
        torch_step = by_threads[best]
        t_losses = torch_result["losses"]
        record.update({
            "torch_step_s": torch_step["median"], "torch_threads": int(best),
            "torch_by_threads": by_threads,
            "speed_ratio_torch_over_jax": torch_step["median"] / synthetic["median"],
            "torch_tokens_per_s": torch_result["tokens"] / torch_step["median"],
            "tokens_match": torch_result["tokens"] == tokens0,
            "torch_nonpad_fraction": torch_result["tokens"] / torch_result["padded_tokens"],
            "loss_step1_jax": losses[0], "loss_step1_torch": t_losses[0],
            "loss_step1_abs_diff": abs(losses[0] - t_losses[0]),
            "loss_step2_jax": losses[1] if len(losses) > 1 else None,
            "loss_step2_torch": t_losses[1] if len(t_losses) > 1 else None,
            "loss_step2_abs_diff": abs(losses[1] - t_losses[1]) if min(len(losses), len(t_losses)) > 1 else None})
    record.update({"loss_step1_jax_real_pipeline": jax_result["real_first_loss"], "load_avg_before": load_before,
                   "load_avg_after": load_average()})
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,mid", help="CPU configs to run: tiny, mid")
    parser.add_argument("--batch_tiny", type=int, default=32)
    parser.add_argument("--batch_mid", type=int, default=8)
    parser.add_argument("--steps_tiny", type=int, default=20)
    parser.add_argument("--steps_mid", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each timed block")
    parser.add_argument("--num_workers", type=int, default=1, help="data.num_workers of the real pipeline")
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--patches_per_row", type=int, default=128)
    parser.add_argument("--vision_block", type=int, default=64)
    parser.add_argument("--skip_torch", action="store_true")
    parser.add_argument("--cpu_torch_threads", default=f"1,{os.cpu_count()}",
                        help="PyTorch intra-op thread counts tried on CPU; the ratio uses the fastest")
    parser.add_argument("--gpu", action="store_true", help="2B shapes, bf16, remat full (see the docstring)")
    parser.add_argument("--gpu_quick", action="store_true", help="with --gpu: batch 16, seq 512, 336px, 5 steps")
    parser.add_argument("--tiny_gpu_shapes", action="store_true", help="with --gpu: tiny preset, CPU dry run")
    parser.add_argument("--gpu_batch", type=int, default=32)
    parser.add_argument("--gpu_seq", type=int, default=1024)
    parser.add_argument("--gpu_image", type=int, default=448, help="square image side, a multiple of 28")
    parser.add_argument("--gpu_steps", type=int, default=10)
    parser.add_argument("--gpu_warmup", type=int, default=2)
    parser.add_argument("--gpu_attention", default="", help="cudnn or xla (default: cudnn on GPU, xla on CPU)")
    parser.add_argument("--gpu_skip_torch", action="store_true")
    # worker arguments
    parser.add_argument("--worker", choices=("jax_cpu", "jax_gpu", "torch"), help=argparse.SUPPRESS)
    for name in ("config", "model_dir", "work_dir", "data", "torch_device", "torch_dtype", "torch_threads"):
        parser.add_argument(f"--{name}", default="", help=argparse.SUPPRESS)
    for name in ("batch", "steps", "pad_id", "image_size"):
        parser.add_argument(f"--{name}", type=int, default=0, help=argparse.SUPPRESS)
    for name in ("torch_checkpointing", "torch_random_init"):
        parser.add_argument(f"--{name}", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker == "jax_cpu":
        return jax_cpu_worker(args)
    if args.worker == "torch":
        return torch_worker(args)
    if args.worker == "jax_gpu":
        return jax_gpu_worker(args)
    if args.gpu:
        if args.gpu_image % 28:
            raise ValueError(f"--gpu_image={args.gpu_image} must be a multiple of 28 (whole 2x2 merge windows)")
        return gpu_main(args)

    import jax

    from unite_jax.demo.dataset import build_demo_data

    emit({"bench": "env", "mode": "cpu", "backend": jax.default_backend(), "devices": jax.device_count(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__, "load_avg": load_average()})
    root = tempfile.mkdtemp(prefix="unite_train_step_")
    try:
        data = build_demo_data(os.path.join(root, "demo"), scale=0.3)["train_stage1"]
        for name in [c.strip() for c in args.configs.split(",") if c.strip()]:
            emit(cpu_config(name, args, data, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
