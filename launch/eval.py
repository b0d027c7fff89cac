"""Retrieval evaluation: recall@1/5/10 (and MMEB precision@1) of a model on a queries and a candidates file.

    python launch/eval.py --model=DIR --queries=Q.jsonl --candidates=C.jsonl [--output=FILE.json]
        [--instruction="..."] [--candidate_instruction="..."] [--cache_dir=DIR] [--backend=auto|numpy|faiss]
        [--batch_size=16] [--dtype=float32|bfloat16] [--max_text_tokens=2048] [--video_max_frames=N]

Queries carry "positives": [candidate ids] and optionally "candidates": [ids] (MMEB style: each
query is ranked only among its own candidates, and precision@1 is reported). Prints ONE JSON
object on stdout (metrics as fractions in [0, 1]) and a readable table on stderr; --output also
writes the JSON to a file. Exit code 2 with a one-line message for bad input.

The program is `unite_jax.cli.eval` (also installed as `unite-eval`; `python -m unite_jax.eval`).
"""

import sys

from unite_jax.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
