"""Throughput of the training input pipeline (host side), and host time per batch vs the tiny model's step.

Prints one JSON object per line:
  {"part": "pipeline", "manifest": "image"|"video", "patch_dtype": "uint8"|"float32", "workers": W,
   "examples_per_s": ..., "per_core": ..., "host_ms_per_batch": ..., "cpu_ms_per_example": ...,
   "examples_per_cpu_s": ...}  examples/s (wall) at
   0, 1 and 2 worker processes (per_core divides by max(W, 1)), and the CPU time (all processes) per
   example: examples_per_cpu_s is the throughput of one fully available core, the number to compare
   with the target of 100 photos/s per worker core. The first batch (worker start-up) is not timed.
  {"part": "step", ...}  host time per batch of the tiny preset's data settings (0 workers) next to the
   tiny model's jitted train step (forward + backward of MAMCL over query and candidate embeddings)
   on that same batch, and their ratio.

The image-heavy manifest pairs a caption with a 640x480 JPEG photo at UNITE's image budget
(256..1280 x 28x28 pixels: 1564 patches per photo); the video-heavy one pairs a caption with an
8 s, 24 fps 320x240 H.264 clip sampled at UNITE's settings (1 fps, 4..12 frames, ~240x320 pixels per
frame). Media are generated into a temporary directory (smooth gradients plus noise, so JPEG and
H.264 do real work).

    python benchmarks/pipeline.py                 # all parts
    python benchmarks/pipeline.py --skip_step --workers 0,2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def _photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A photo-like uint8 image: smooth colour gradients plus sensor-like noise."""
    y = np.linspace(0, 1, height)[:, None]
    x = np.linspace(0, 1, width)[None, :]
    phase = rng.uniform(0, 2 * np.pi, 3)
    channels = [127 + 100 * np.sin(3 * x + 2 * y + p) for p in phase]
    image = np.stack(channels, -1) + rng.normal(0, 12, (height, width, 3))
    return image.clip(0, 255).astype(np.uint8)


def make_media(root: str, num_photos: int, num_videos: int, seconds: float = 8.0, fps: int = 24) -> tuple[list, list]:
    import av
    from PIL import Image

    rng = np.random.default_rng(0)
    photos, videos = [], []
    for i in range(num_photos):
        path = os.path.join(root, f"photo{i}.jpg")
        Image.fromarray(_photo(rng, 480, 640)).save(path, quality=90)
        photos.append(path)
    for i in range(num_videos):
        path = os.path.join(root, f"clip{i}.mp4")
        base = _photo(rng, 240, 320)
        with av.open(path, "w") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
            for t in range(int(seconds * fps)):
                frame = np.roll(base, 4 * t, axis=1)  # a panning shot
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        videos.append(path)
    return photos, videos


def write_manifest(path: str, kind: str, media_paths: list, count: int) -> str:
    with open(path, "w") as f:
        for i in range(count):
            record = {"query": {"text": f"a photo of scene number {i} in the park"},
                      "candidate": {kind: media_paths[i % len(media_paths)]}}
            f.write(json.dumps(record) + "\n")
    return path


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its live children (the data workers).

    The machine may be shared: CPU time per example is the cost of one core's work, which wall
    time under contention overstates. Children are read with psutil when it is installed.
    """
    total = time.process_time()
    try:
        import psutil
    except ImportError:
        return total
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure(cfg, spec, tokenizer, processor, batches: int) -> dict:
    from unite_jax.data.pipeline import build_train_iterator

    with build_train_iterator(cfg, spec, tokenizer, processor, seed=0, process_index=0, process_count=1) as it:
        start = time.perf_counter()
        next(it)  # worker start-up and first fill are not timed
        first = time.perf_counter() - start
        start, cpu_start = time.perf_counter(), cpu_seconds()
        for _ in range(batches):
            batch = next(it)
        elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    examples = batches * spec.local_batch_size
    # workers run a little ahead of the consumer (buffer of worker_buffer_size batches each), so with
    # workers the CPU time per example is slightly overstated
    return {"examples_per_s": round(examples / elapsed, 2), "host_ms_per_batch": round(1000 * elapsed / batches, 1),
            "cpu_ms_per_example": round(1000 * cpu / examples, 2),
            "examples_per_cpu_s": round(examples / cpu, 1),
            "first_batch_s": round(first, 2), "batch_examples": spec.local_batch_size,
            "batch_bytes": int(sum(a.nbytes for v in batch.arrays.values()
                                   for a in (v.values() if isinstance(v, dict) else [v])))}


def pipeline_part(args, root, tokenizer) -> None:
    from unite_jax.data import media
    from unite_jax.data.pipeline import BatchSpec, default_data_config

    photos, videos = make_media(root, args.photos, args.videos)
    manifests = {"image": write_manifest(os.path.join(root, "image.jsonl"), "image", photos, 4096),
                 "video": write_manifest(os.path.join(root, "video.jsonl"), "video", videos, 1024)}
    # UNITE's training pre-processing: images in [256, 1280] x 28^2 pixels; video frames ~240x320, 1 fps, 4..12
    processor = media.ProcessorConfig(video_max_pixels=240 * 320)
    for kind, manifest in manifests.items():
        if kind not in args.manifests:
            continue
        for patch_dtype in args.patch_dtypes:
            for workers in args.workers:
                cfg = default_data_config()
                cfg.train, cfg.num_workers, cfg.seq_len, cfg.patch_dtype = manifest, workers, 512, patch_dtype
                cfg.patches_per_row = cfg.vision_block = 2048
                spec = BatchSpec.from_config(cfg, num_chunks=1, local_shards=1, rows_per_shard=args.batch,
                                             pad_id=tokenizer.pad_id, patch_dim=processor.patch_dim)
                batches = args.image_batches if kind == "image" else args.video_batches
                result = measure(cfg, spec, tokenizer, processor, batches)
                result["per_core"] = round(result["examples_per_s"] / max(workers, 1), 2)
                emit({"part": "pipeline", "manifest": kind, "patch_dtype": patch_dtype, "workers": workers, **result,
                      "patches_per_row": cfg.patches_per_row, "seq_len": cfg.seq_len, "cpu_count": os.cpu_count()})


def step_part(args, root, tokenizer) -> None:
    import jax

    from unite_jax.data import media
    from unite_jax.data.pipeline import BatchSpec, build_train_iterator, default_data_config
    from unite_jax.loss import mamcl_loss
    from unite_jax.model.config import preset
    from unite_jax.model.embedder import embed
    from unite_jax.model.options import RunOptions
    from unite_jax.model.params import init_params
    from unite_jax.model.pixels import normalize_stream

    photos, _ = make_media(root, 8, 0)
    manifest = write_manifest(os.path.join(root, "tiny.jsonl"), "image", photos, 1024)
    # the tiny preset's pixel budget (unite_jax.convert.random_model): 16..256 x 28^2 pixels
    processor = media.ProcessorConfig(min_pixels=16 * 28 * 28, max_pixels=256 * 28 * 28)
    cfg = default_data_config()
    cfg.train, cfg.seq_len, cfg.patches_per_row, cfg.vision_block = manifest, 320, 1024, 1024
    spec = BatchSpec.from_config(cfg, num_chunks=1, local_shards=1, rows_per_shard=args.batch,
                                 pad_id=tokenizer.pad_id, patch_dim=processor.patch_dim)
    host = measure(cfg, spec, tokenizer, processor, args.image_batches)
    with build_train_iterator(cfg, spec, tokenizer, processor, seed=0, process_index=0, process_count=1) as it:
        arrays = next(it).arrays
    model_cfg = preset("tiny")
    run = RunOptions(vision_block=spec.vision_block)
    params = init_params(model_cfg, seed=0, std=0.05)
    query = {k: v[0] for k, v in arrays["query"].items()}
    candidate = {k: v[0] for k, v in arrays["candidate"].items()}
    modality = arrays["candidate_modality"][0]

    table = media.normalize_table(processor)  # the batch's patches are uint8 levels

    def loss_fn(llm, frozen, q, c, m):
        p = dict(frozen, model=llm)
        q, c = normalize_stream(q, table), normalize_stream(c, table)
        return mamcl_loss(embed(p, q, model_cfg, run), embed(p, c, model_cfg, run), m)[0]

    step = jax.jit(jax.value_and_grad(loss_fn))
    frozen = {k: v for k, v in params.items() if k != "model"}
    jax.block_until_ready(step(params["model"], frozen, query, candidate, modality))  # compile
    start = time.perf_counter()
    for _ in range(args.steps):
        jax.block_until_ready(step(params["model"], frozen, query, candidate, modality))
    step_ms = 1000 * (time.perf_counter() - start) / args.steps
    emit({"part": "step", "model": "tiny", "batch_examples": spec.local_batch_size,
          "host_ms_per_batch": host["host_ms_per_batch"], "step_ms": round(step_ms, 1),
          "host_over_step": round(host["host_ms_per_batch"] / step_ms, 2), "device": str(jax.devices()[0]),
          "seq_len": cfg.seq_len, "patches_per_row": cfg.patches_per_row})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    parser.add_argument("--manifests", default="image,video")
    parser.add_argument("--patch_dtypes", default="uint8,float32",
                        help="data.patch_dtype values: uint8 levels (the default) or host-normalised float32")
    parser.add_argument("--batch", type=int, default=16, help="examples per batch")
    parser.add_argument("--image_batches", type=int, default=12)
    parser.add_argument("--video_batches", type=int, default=3)
    parser.add_argument("--photos", type=int, default=32)
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--skip_step", action="store_true")
    args = parser.parse_args()
    args.workers = [int(w) for w in args.workers.split(",")]
    args.manifests = args.manifests.split(",")
    args.patch_dtypes = args.patch_dtypes.split(",")

    from unite_jax.data import tiny_tokenizer
    from unite_jax.data.tokenize import PromptTokenizer

    with tempfile.TemporaryDirectory() as root:
        tiny_tokenizer.build(os.path.join(root, "tokenizer"))
        tokenizer = PromptTokenizer.from_pretrained(os.path.join(root, "tokenizer"))
        pipeline_part(args, root, tokenizer)
        if not args.skip_step:
            step_part(args, root, tokenizer)


if __name__ == "__main__":  # worker processes are spawned: they re-import this file
    main()
