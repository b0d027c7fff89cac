"""Host memory of loading a checkpoint: peak RSS vs the size of the weights.

    python benchmarks/load_memory.py [--layers=6] [--dtype=bfloat16]

Writes a random model with the 2B preset's widths (fewer layers) as a Hugging
Face directory in float32, then, in a fresh process each, loads it in the
target dtype with `load_hf_params` and moves it to the device the way
`Embedder` does. Prints JSON lines with the weights' size and each process's
peak RSS above its baseline (memory-mapped checkpoint pages count while they
are mapped); the design goal is about one copy of the weights.
"""

import argparse
import json
import subprocess
import sys
import tempfile


def high_water_mark() -> int:
    """Peak resident memory of this process in bytes (VmHWM; ru_maxrss survives exec on Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(model_dir: str, dtype: str, stage: str) -> None:
    import jax

    from unite_jax import parallel
    from unite_jax.convert.hf import load_hf_params
    from unite_jax.model.config import ModelConfig

    jax.devices()  # runtime start-up is part of the baseline
    base = high_water_mark()
    cfg = ModelConfig.from_pretrained(model_dir)
    params = load_hf_params(model_dir, cfg, dtype=dtype)
    weights = sum(x.nbytes for x in jax.tree.leaves(params))
    if stage == "device":
        params = parallel.place_tree(params, jax.sharding.SingleDeviceSharding(jax.devices()[0]), in_place=True)
        jax.block_until_ready(params)
    peak = high_water_mark()
    print(json.dumps({"bench": "load_memory", "stage": stage, "dtype": dtype, "weights_gib": weights / 2**30,
                      "peak_rss_above_baseline_gib": (peak - base) / 2**30,
                      "ratio_to_weights": (peak - base) / weights}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    import dataclasses

    from unite_jax.convert.hf import save_hf_params
    from unite_jax.model.config import preset
    from unite_jax.model.params import init_params

    cfg = preset("2b")
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_layers=args.layers),
                      vision=dataclasses.replace(cfg.vision, depth=args.layers))
    model_dir = tempfile.mkdtemp(prefix="unite_load_")
    save_hf_params(init_params(cfg, dtype="float32"), cfg, model_dir, max_shard_bytes=2 * 10**9)
    for stage in ("host", "device"):
        out = subprocess.run([sys.executable, __file__, "--worker", model_dir, args.dtype, stage],
                             check=True, capture_output=True, text=True)
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
