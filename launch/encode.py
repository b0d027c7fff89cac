"""Encode a JSONL file of items into a float32 .npy of L2-normalised embeddings (one row per line).

    python launch/encode.py --model=DIR --input=FILE.jsonl --output=FILE.npy

Options, input format and exit codes: `--help`, and the docstring of the program, `unite_jax.cli.encode`
(also installed as `unite-encode`; `python -m unite_jax.encode`).
"""

import sys

from unite_jax.cli.encode import main

if __name__ == "__main__":
    sys.exit(main())
