"""Retrieval evaluation: recall@1/5/10 (and MMEB precision@1) of a model on a queries and a candidates file.

    python launch/eval.py --model=DIR --queries=Q.jsonl --candidates=C.jsonl [--output=FILE.json]

Options, input format and exit codes: `--help`, and the docstring of the program, `unite_jax.cli.eval`
(also installed as `unite-eval`; `python -m unite_jax.eval`).
"""

import sys

from unite_jax.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
