"""Encode a JSONL file of items into a float32 .npy of L2-normalised embeddings (one row per line).

    python launch/encode.py --model=DIR --input=FILE.jsonl --output=FILE.npy
        [--batch_size=16] [--dtype=float32|bfloat16] [--instruction="..."] [--max_text_tokens=2048]
        [--shard_size=10000] [--max_shards=N] [--video_max_frames=N] [--video_fps=F]

Each line is {"id": str, "text"?: str, "image"?: path, "video"?: path} (paths relative to the
JSONL file; "positives"/"candidates" of an evaluation queries file are allowed and ignored).
Writes FILE.npy ([N, D], input order) and FILE.ids.txt (one id per line). Work is saved in
shards under FILE.npy.parts/; rerunning after an interruption skips finished shards. Exit codes:
0 done, 2 bad input (one-line message on stderr), 3 stopped early by --max_shards.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from unite_jax.cli import common as cli  # noqa: E402
from unite_jax.eval.items import QUERY_KEYS, encode_inputs, items_fingerprint, read_items  # noqa: E402
from unite_jax.eval.store import encode_to_file, ids_path_for, run_key  # noqa: E402
from unite_jax.progress import log  # noqa: E402

INCOMPLETE = 3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_model_flags(parser)
    parser.add_argument("--input", required=True, help="items JSONL file")
    parser.add_argument("--output", required=True, help="output .npy (ids go to the same name with .ids.txt)")
    parser.add_argument("--instruction", default=None,
                        help='put in front of every item\'s text ("INSTRUCTION\\nTEXT"), e.g. for queries')
    parser.add_argument("--shard_size", type=int, default=10_000, help="items per resumable shard")
    parser.add_argument("--max_shards", type=int, default=None,
                        help="stop after encoding this many new shards (rerun to continue)")
    args = parser.parse_args(argv)
    cli.check_model_flags(args)
    ids_path = ids_path_for(args.output)
    if args.shard_size < 1:
        raise ValueError(f"--shard_size must be >= 1, got {args.shard_size}")
    items = read_items(args.input, extra_keys=QUERY_KEYS)
    key = run_key(model=cli.model_key(args), items=items_fingerprint(args.input, items),
                  instruction=args.instruction or None)
    inputs = encode_inputs(items, args.instruction)
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    complete = encode_to_file(cli.lazy_encode_fn(args), inputs, [item["id"] for item in items], args.output, key=key,
                              shard_size=args.shard_size, chunk_size=max(64, 8 * args.batch_size),
                              max_shards=args.max_shards)
    if not complete:
        return INCOMPLETE
    log(f"wrote {args.output} ({len(items)} vectors) and {ids_path}")
    return 0


def cli_main(argv=None) -> int:
    """main() with input mistakes reported as one line on stderr and exit code 2."""
    return cli.run_main(main, argv, prog="encode.py")


if __name__ == "__main__":
    sys.exit(cli_main())
