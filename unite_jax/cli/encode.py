"""Encode a JSONL file of items into a float32 .npy of L2-normalised embeddings (one row per line).

    unite-encode --model=DIR --input=FILE.jsonl --output=FILE.npy       (or python launch/encode.py ...)
        [--batch_size=16] [--dtype=float32|bfloat16] [--instruction="..."] [--max_text_tokens=2048]
        [--shard_size=10000] [--max_shards=N] [--video_max_frames=N] [--video_fps=F]

Each line is {"id": str, "text"?: str, "image"?: path, "video"?: path} (paths relative to the
JSONL file; "positives"/"candidates" of an evaluation queries file are allowed and ignored).
Writes FILE.npy ([N, D], input order) and FILE.ids.txt (one id per line). Work is saved in
shards under FILE.npy.parts/; rerunning after an interruption skips finished shards. Exit codes:
0 done, 2 bad input (one-line message on stderr), 3 stopped early by --max_shards.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from unite_jax.cli import common
from unite_jax.eval.items import QUERY_KEYS, encode_inputs, items_fingerprint, read_items
from unite_jax.eval.store import encode_to_file, ids_path_for, run_key
from unite_jax.progress import log

INCOMPLETE = 3


def _main(argv: Sequence[str] | None, prog: str) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    common.add_model_flags(parser)
    parser.add_argument("--input", required=True, help="items JSONL file")
    parser.add_argument("--output", required=True, help="output .npy (ids go to the same name with .ids.txt)")
    parser.add_argument("--instruction", default=None,
                        help='put in front of every item\'s text ("INSTRUCTION\\nTEXT"), e.g. for queries')
    parser.add_argument("--shard_size", type=int, default=10_000, help="items per resumable shard")
    parser.add_argument("--max_shards", type=int, default=None,
                        help="stop after encoding this many new shards (rerun to continue)")
    args = parser.parse_args(argv)
    common.check_model_flags(args)
    ids_path = ids_path_for(args.output)
    if args.shard_size < 1:
        raise ValueError(f"--shard_size must be >= 1, got {args.shard_size}")
    items = read_items(args.input, extra_keys=QUERY_KEYS)
    key = run_key(model=common.model_key(args), items=items_fingerprint(args.input, items),
                  instruction=args.instruction or None)
    inputs = encode_inputs(items, args.instruction)
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    complete = encode_to_file(common.lazy_encode_fn(args), inputs, [item["id"] for item in items], args.output, key=key,
                              shard_size=args.shard_size, chunk_size=max(64, 8 * args.batch_size),
                              max_shards=args.max_shards)
    if not complete:
        return INCOMPLETE
    log(f"wrote {args.output} ({len(items)} vectors) and {ids_path}")
    return 0


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """The command line: input mistakes are one line on stderr (`PROG: error: ...`) and exit code 2."""
    return common.run_main(_main, argv, prog)


if __name__ == "__main__":
    sys.exit(main())
