"""Host memory of converting checkpoints: peak RSS vs the size of the weights.

    python benchmarks/convert_memory.py [--layers=6] [--dtype=bfloat16] [--group_mb=1024]

Writes a random model with the 2B preset's widths (fewer layers) as a Hugging
Face directory in --dtype, then, in a fresh process each: converts it to an
Orbax model directory (`hf_to_model_dir`), exports that back to Hugging Face
(`model_dir_to_hf`), and loads the model directory into host memory
(`load_model_dir`). Prints one JSON line per stage with the weights' size and
the process's peak RSS (VmHWM) above its baseline after imports; the export
must stay below one copy of the weights.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from load_memory import high_water_mark  # noqa: E402


def worker(stage: str, src: str, dst: str, weights: int, group_bytes: int) -> None:
    import jax
    import orbax.checkpoint  # noqa: F401  (imports are part of the baseline)

    from unite_jax.convert import conversions, orbax_model

    group_bytes = group_bytes or orbax_model.RESTORE_GROUP_BYTES

    jax.devices()
    base = high_water_mark()
    start = time.time()
    if stage == "import":
        conversions.hf_to_model_dir(src, dst)
    elif stage == "export":
        conversions.model_dir_to_hf(src, dst, group_bytes=group_bytes)
    else:
        params, _, _ = orbax_model.load_model_dir(src, group_bytes=group_bytes)
        assert sum(x.nbytes for x in jax.tree.leaves(params)) == weights
    peak = high_water_mark()
    print(json.dumps({"bench": "convert_memory", "stage": stage, "weights_gib": round(weights / 2**30, 3),
                      "peak_rss_above_baseline_gib": round((peak - base) / 2**30, 3),
                      "ratio_to_weights": round((peak - base) / weights, 3),
                      "seconds": round(time.time() - start, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--group_mb", type=int, default=0,
                        help="restore group size of export / load in MiB (0: the library default)")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        stage, src, dst, weights, group = args.worker
        return worker(stage, src, dst, int(weights), int(group))
    import dataclasses

    import jax

    from unite_jax.convert.hf import save_hf_params
    from unite_jax.data import media, tiny_tokenizer
    from unite_jax.model.config import preset
    from unite_jax.model.params import init_params

    cfg = preset("2b")
    # the tiny tokenizer's special-token ids, so the tokenizer check passes without a download
    ids = tiny_tokenizer.SPECIAL_TOKEN_IDS
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_layers=args.layers),
                      vision=dataclasses.replace(cfg.vision, depth=args.layers),
                      image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"])
    root = tempfile.mkdtemp(prefix="unite_convert_")
    try:
        hf_dir, model_dir, export_dir = (os.path.join(root, n) for n in ("hf", "model", "export"))
        params = init_params(cfg, dtype=args.dtype)
        weights = sum(x.nbytes for x in jax.tree.leaves(params))
        save_hf_params(params, cfg, hf_dir, max_shard_bytes=2 * 10**9)
        del params
        tiny_tokenizer.build(hf_dir)
        media.ProcessorConfig().save_pretrained(hf_dir)
        group = args.group_mb * 2**20
        for stage, src, dst in (("import", hf_dir, model_dir), ("export", model_dir, export_dir),
                                ("load", model_dir, "-")):
            out = subprocess.run([sys.executable, __file__, "--worker", stage, src, dst, str(weights), str(group)],
                                 check=True, capture_output=True, text=True)
            print(out.stdout.strip().splitlines()[-1], flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
