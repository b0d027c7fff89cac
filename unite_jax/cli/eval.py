"""Retrieval evaluation: recall@1/5/10 (and MMEB precision@1) of a model on a queries and a candidates file.

    unite-eval --model=DIR --queries=Q.jsonl --candidates=C.jsonl [--output=FILE.json]   (or python launch/eval.py ...)
        [--instruction="..."] [--candidate_instruction="..."] [--cache_dir=DIR] [--backend=auto|numpy|faiss]
        [--batch_size=16] [--dtype=float32|bfloat16] [--max_text_tokens=2048] [--video_max_frames=N]

Queries carry "positives": [candidate ids] and optionally "candidates": [ids] (MMEB style: each
query is ranked only among its own candidates, and precision@1 is reported). Prints ONE JSON
object on stdout (metrics as fractions in [0, 1]) and a readable table on stderr; --output also
writes the JSON to a file. Exit code 2 with a one-line message for bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from unite_jax import files
from unite_jax.cli import common
from unite_jax.eval.evaluate import evaluate, format_table
from unite_jax.eval.retrieval import BACKENDS


def _main(argv: Sequence[str] | None, prog: str) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    common.add_model_flags(parser)
    parser.add_argument("--queries", required=True, help="queries JSONL (items with 'positives')")
    parser.add_argument("--candidates", required=True, help="candidates JSONL (items)")
    parser.add_argument("--output", default=None, help="also write the JSON result to this file")
    parser.add_argument("--instruction", default=None, help='query instruction ("INSTRUCTION\\nTEXT")')
    parser.add_argument("--candidate_instruction", default=None, help="candidate instruction (same form)")
    parser.add_argument("--cache_dir", default=None,
                        help="store/reuse embeddings here, keyed by model files, flags and file contents "
                             "(default: no cache)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="top-k search: numpy, faiss (pip install -e '.[faiss]'), or auto (faiss for large "
                             "corpora when installed); identical results")
    args = parser.parse_args(argv)
    common.check_model_flags(args)
    encode_fn = common.lazy_encode_fn(args)
    key = common.model_key(args)  # also fails early, with a clear message, on a missing model directory
    result = evaluate(encode_fn, args.queries, args.candidates, batch_size=max(64, 8 * args.batch_size),
                      query_instruction=args.instruction, candidate_instruction=args.candidate_instruction,
                      cache_dir=args.cache_dir, model_key=key, backend=args.backend, show_progress=True)
    text = json.dumps(result)
    print(format_table(result), file=sys.stderr, flush=True)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        files.write_text(args.output, text + "\n")
    print(text, flush=True)
    return 0


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """The command line: input mistakes are one line on stderr (`PROG: error: ...`) and exit code 2."""
    return common.run_main(_main, argv, prog)


if __name__ == "__main__":
    sys.exit(main())
