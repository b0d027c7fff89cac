"""`python -m unite_jax.encode --model=... --input=... --output=...` (`unite_jax.cli.encode`)."""

import sys

from unite_jax.cli.encode import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m unite_jax.encode"))
