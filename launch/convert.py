"""Converts between Hugging Face directories and this project's Orbax model directories.

    python launch/convert.py --src=DIR --dst=DIR [--overwrite] [--dtype=bfloat16|float32]

Options, input format and exit codes: `--help`, and the docstring of the program, `unite_jax.cli.convert`
(also installed as `unite-convert`; `python -m unite_jax.convert`).
"""

import sys

from unite_jax.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
