"""Converts between Hugging Face directories and this project's Orbax model directories.

    unite-convert --src=DIR --dst=DIR [--overwrite] [--dtype=bfloat16|float32]   (or python launch/convert.py ...)

The direction follows from --src: a Hugging Face Qwen2-VL / UNITE directory
(config.json + *.safetensors, transformers 4.x or 5.x layout) becomes an Orbax
model directory; an Orbax model directory (unite_model.json + params/) or a
finished training workdir (WORKDIR/model) becomes a Hugging Face directory that
`transformers.Qwen2VLForConditionalGeneration.from_pretrained` loads, with the
tokenizer, pre-processor files and a model card. The weights keep their dtype
unless --dtype is given. Errors are one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

DTYPES = ("bfloat16", "float32", "float16")


def parse_args(argv: Sequence[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="Hugging Face dir, Orbax model dir, or finished training workdir")
    parser.add_argument("--dst", required=True, help="output directory (must be empty or absent, see --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="cast the weights (default: keep their dtype)")
    parser.add_argument("--max_shard_gb", type=float, default=5.0,
                        help="Hugging Face export: largest safetensors shard in GB (10^9 bytes)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """The command line: errors are one line on stderr (`PROG: error: ...`) and exit code 2."""
    prog = prog or os.path.basename(sys.argv[0])
    args = parse_args(argv, prog)
    if args.max_shard_gb <= 0:
        return _fail(prog, f"--max_shard_gb must be positive, got {args.max_shard_gb}")
    from unite_jax.convert import conversions  # after argument parsing: --help stays fast

    start = time.time()
    try:
        direction, dst = conversions.convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                                             max_shard_bytes=int(args.max_shard_gb * 10**9))
    except (OSError, ValueError) as e:  # FileNotFoundError, FileExistsError, ModelDirError, CheckpointError, ...
        return _fail(prog, str(e))
    what = "Orbax model directory" if direction == "hf_to_orbax" else "Hugging Face directory"
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(dst) for f in files)
    print(f"wrote {what} {dst} ({size / 1e9:.3f} GB) in {time.time() - start:.1f} s")
    return 0


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
