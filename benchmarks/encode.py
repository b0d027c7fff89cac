"""Encoding files: `launch/encode.py`'s path vs a transformers (PyTorch) reference, same items, same CPU.

    python benchmarks/encode.py [--batch=8] [--repeats=2] [--max_items=0] [--skip_cli] [--torch_threads=1,N]

Items: every queries/candidates file of the demo eval set (`launch/make_demo_data.py`: text,
images, videos, text+image and text+video MMEB-style queries), concatenated into one JSONL.
Model: the mid-size random Qwen2-VL of `benchmarks/embed.py` (LLM 512 x 8 layers, vision 256 x 4).
Each framework runs in its own worker process:
- jax: `encode_to_file` with `Embedder.encode` (what `launch/encode.py` runs after start-up):
  reading the JSONL, decoding and pre-processing media, tokenising, encoding, writing the .npy;
  timed after a warm-up pass that compiles every shape bucket;
- torch: the UNITE recipe in transformers, batches of the same size in file order: images through
  `Qwen2VLImageProcessorPil`, videos decoded and pre-processed by this library (transformers'
  video processor needs torchvision, which does not work with this torch), prompts written out
  literally, `AutoTokenizer`, left padding, vision features scattered into the pad slots, last
  position, L2 normalisation; timed after a warm-up pass. It runs once per thread count in
  --torch_threads (default 1 and all cores: on a shared, oversubscribed CPU, OpenMP's threads
  wait on each other and one thread can be several times faster), and the faster run is the reference.
- cli: one cold run of `python launch/encode.py` on the file (start-up, loading, compilation included).
Prints JSON lines: one per worker run, then the comparison (items/s from the median pass and from
the best pass, ratio > 1 means JAX faster, max |difference| of the vectors). The env line records
the load average, since other processes on the CPU change every number.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")

from embed import MID, emit, write_mid_model  # noqa: E402  (benchmarks/embed.py)

HEAD = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
TAIL = "\nSummary above {} in one word:<|im_end|>\n<|im_start|>assistant\n<|endoftext|>"


def write_items_file(data_dir: str, max_items: int) -> tuple[str, dict]:
    """All demo eval items in one JSONL next to the eval folders; returns (path, counts per modality)."""
    lines, counts = [], {}
    for path in sorted(glob.glob(os.path.join(data_dir, "eval", "*", "*.jsonl"))):
        task_dir = os.path.dirname(path)
        prefix = f"{os.path.basename(task_dir)}/{os.path.basename(path)[:-6]}/"
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                item = {"id": prefix + record["id"]}
                for key in ("text", "image", "video"):
                    if key in record:
                        value = record[key]
                        item[key] = value if key == "text" else os.path.relpath(os.path.join(task_dir, value), data_dir)
                lines.append((json.dumps(item), "+".join(k for k in ("text", "image", "video") if k in item)))
    lines = lines[:max_items] if max_items else lines
    for _, kind in lines:
        counts[kind] = counts.get(kind, 0) + 1
    lines = [line for line, _ in lines]
    out = os.path.join(data_dir, "all_eval_items.jsonl")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    return out, counts


# ----------------------------------------------------------------------------- workers
def jax_worker(args) -> None:
    from unite_jax import Embedder
    from unite_jax.eval.items import model_inputs, read_items
    from unite_jax.eval.store import encode_to_file

    start = time.perf_counter()
    embedder = Embedder.from_pretrained(args.model_dir)
    load_s = time.perf_counter() - start

    def one_pass(output):
        items = read_items(args.items)  # reading and checking the file is part of the measured path
        encode_to_file(lambda batch: embedder.encode(batch, batch_size=args.batch), [model_inputs(i) for i in items],
                       [i["id"] for i in items], output, key="bench", chunk_size=max(64, 8 * args.batch),
                       show_progress=False)
        return len(items)

    start = time.perf_counter()
    count = one_pass(os.path.join(args.work_dir, "warm.npy"))
    warm_s = time.perf_counter() - start
    times = []
    for r in range(args.repeats):
        start = time.perf_counter()
        one_pass(os.path.join(args.work_dir, f"jax_{r}.npy"))
        times.append(time.perf_counter() - start)
    emit({"worker": "jax", "items": count, "load_s": load_s, "first_pass_s": warm_s, "pass_s": float(np.median(times)),
          "best_pass_s": min(times), "vectors": os.path.join(args.work_dir, "jax_0.npy")})


def torch_worker(args) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    from unite_jax.data import media

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = Qwen2VLForConditionalGeneration.from_pretrained(args.model_dir, dtype=torch.float32,
                                                            attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    processor_cfg = media.ProcessorConfig.from_pretrained(args.model_dir)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=processor_cfg.min_pixels,
                                               max_pixels=processor_cfg.max_pixels)
    load_s = time.perf_counter() - start
    base = os.path.dirname(os.path.abspath(args.items))
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    from PIL import Image

    def prompt_and_media(record):
        text = (record.get("text") or "").strip()
        has_text = bool(text.replace("<|IMAGE|>", "").replace("<|VIDEO|>", "").strip())
        visions = []
        if "image" in record:
            out = image_processor(images=[Image.open(os.path.join(base, record["image"])).convert("RGB")],
                                  return_tensors="np")
            visions.append(("image", out["pixel_values"], out["image_grid_thw"][0]))
        if "video" in record:
            patches, grid = media.preprocess_video(os.path.join(base, record["video"]), processor_cfg)
            visions.append(("video", patches, grid))
        prefix = ""  # without placeholders the vision blocks go before the text, images first
        for kind, _, grid in visions:
            block = "<|vision_start|>" + f"<|{kind}_pad|>" * int(np.prod(grid) // 4) + "<|vision_end|>"
            placeholder = f"<|{kind.upper()}|>"
            if placeholder in text:
                text = text.replace(placeholder, block, 1)
            else:
                prefix += block
        text = prefix + text
        names = [n for n, present in (("sentence", has_text), ("image", "image" in record),
                                      ("video", "video" in record)) if present]
        return HEAD + text + TAIL.format(" and ".join(names)), visions

    def encode_batch(records):
        prompts, visions = zip(*(prompt_and_media(r) for r in records))
        encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        seq = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), seq), pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), seq), dtype=torch.long)
        for i, e in enumerate(encoded):
            ids[i, seq - len(e):] = torch.tensor(e)
            mask[i, seq - len(e):] = 1
        embeds = model.model.language_model.embed_tokens(ids)
        for kind, token_id in (("image", model.config.image_token_id), ("video", model.config.video_token_id)):
            chosen = [(p, g) for vs in visions for k, p, g in vs if k == kind]
            if chosen:
                features = model.model.visual(torch.tensor(np.concatenate([p for p, _ in chosen])),
                                              grid_thw=torch.tensor(np.stack([g for _, g in chosen]))).pooler_output
                embeds = embeds.masked_scatter((ids == token_id).unsqueeze(-1).expand_as(embeds), features)
        hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state[:, -1]
        return torch.nn.functional.normalize(hidden, dim=-1).numpy()

    def one_pass():
        with open(args.items) as f:
            records = [json.loads(line) for line in f if line.strip()]
        with torch.no_grad():
            return np.concatenate([encode_batch(records[i:i + args.batch]) for i in range(0, len(records), args.batch)])

    start = time.perf_counter()
    vectors = one_pass()
    warm_s = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - start)
    out = os.path.join(args.work_dir, f"torch_{args.threads}.npy")
    np.save(out, vectors.astype(np.float32))
    emit({"worker": "torch", "threads": args.threads, "items": len(vectors), "load_s": load_s,
          "first_pass_s": warm_s, "pass_s": float(np.median(times)), "best_pass_s": min(times), "vectors": out})


# ----------------------------------------------------------------------------- driver
def run_worker(kind: str, args, model_dir: str, items: str, work_dir: str, threads: int = 0) -> dict:
    command = [sys.executable, os.path.abspath(__file__), f"--worker={kind}", f"--model_dir={model_dir}",
               f"--items={items}", f"--work_dir={work_dir}", f"--batch={args.batch}", f"--repeats={args.repeats}",
               f"--threads={threads}"]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max_items", type=int, default=0, help="use only the first N items (0: all)")
    parser.add_argument("--skip_cli", action="store_true")
    parser.add_argument("--torch_threads", default=f"1,{os.cpu_count() or 1}",
                        help="comma-separated torch thread counts to try (the faster is the reference)")
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=("torch", "jax"), help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    parser.add_argument("--items", help=argparse.SUPPRESS)
    parser.add_argument("--work_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "torch":
        return torch_worker(args)
    if args.worker == "jax":
        return jax_worker(args)

    import jax

    from unite_jax.demo.dataset import build_demo_data

    work_dir = tempfile.mkdtemp(prefix="unite_bench_encode_")
    model_dir, data_dir = os.path.join(work_dir, "model"), os.path.join(work_dir, "data")
    write_mid_model(model_dir)
    build_demo_data(data_dir)
    items, counts = write_items_file(data_dir, args.max_items)
    emit({"bench": "env", "backend": jax.default_backend(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "load_average_before": os.getloadavg(),
          "items": sum(counts.values()), "modalities": counts,
          "config": MID, "batch": args.batch})
    runs = []
    for kind, threads in [("torch", int(t)) for t in sorted({int(t) for t in args.torch_threads.split(",")})] + [
            ("jax", 0)]:
        run = run_worker(kind, args, model_dir, items, work_dir, threads)
        runs.append(run)
        emit({"bench": f"encode_file_{kind}", **{k: v for k, v in run.items() if k != "vectors"},
              "items_per_s": run["items"] / run["pass_s"], "best_items_per_s": run["items"] / run["best_pass_s"]})
    results = {"jax": runs[-1], "torch": min(runs[:-1], key=lambda r: r["pass_s"])}
    diff = float(np.abs(np.load(results["jax"]["vectors"]) - np.load(results["torch"]["vectors"])).max())
    rate = {k: results[k]["items"] / results[k]["pass_s"] for k in results}
    best = {k: results[k]["items"] / results[k]["best_pass_s"] for k in results}
    emit({"bench": "encode_file", "items": results["jax"]["items"], "batch": args.batch,
          "torch_threads": results["torch"]["threads"], "jax_items_per_s": rate["jax"],
          "torch_items_per_s": rate["torch"], "speed_ratio_jax_over_torch": rate["jax"] / rate["torch"],
          "best_pass_ratio_jax_over_torch": best["jax"] / best["torch"], "max_abs_diff_vs_torch": diff,
          "load_average_after": os.getloadavg()})
    if not args.skip_cli:
        output = os.path.join(work_dir, "cli.npy")
        start = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(ROOT, "launch", "encode.py"), f"--model={model_dir}",
                        f"--input={items}", f"--output={output}", f"--batch_size={args.batch}"], check=True,
                       capture_output=True)
        wall = time.perf_counter() - start
        emit({"bench": "encode_cli_cold", "items": results["jax"]["items"], "wall_s": wall,
              "items_per_s": results["jax"]["items"] / wall,
              "max_abs_diff_vs_library": float(np.abs(np.load(output) - np.load(results["jax"]["vectors"])).max())})


if __name__ == "__main__":
    main()
