"""Encode a JSONL file of items into a float32 .npy of L2-normalised embeddings (one row per line).

    python launch/encode.py --model=DIR --input=FILE.jsonl --output=FILE.npy
        [--batch_size=16] [--dtype=float32|bfloat16] [--instruction="..."] [--max_text_tokens=2048]
        [--shard_size=10000] [--max_shards=N] [--video_max_frames=N] [--video_fps=F]

Each line is {"id": str, "text"?: str, "image"?: path, "video"?: path} (paths relative to the
JSONL file; "positives"/"candidates" of an evaluation queries file are allowed and ignored).
Writes FILE.npy ([N, D], input order) and FILE.ids.txt (one id per line). Work is saved in
shards under FILE.npy.parts/; rerunning after an interruption skips finished shards. Exit codes:
0 done, 2 bad input (one-line message on stderr), 3 stopped early by --max_shards.

The program is `unite_jax.cli.encode` (also installed as `unite-encode`; `python -m unite_jax.encode`).
"""

import sys

from unite_jax.cli.encode import main

if __name__ == "__main__":
    sys.exit(main())
