"""`python -m unite_jax.eval --model=... --queries=... --candidates=...` (`unite_jax.cli.eval`)."""

import sys

from unite_jax.cli.eval import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m unite_jax.eval"))
