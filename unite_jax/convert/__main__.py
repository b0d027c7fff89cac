"""`python -m unite_jax.convert --src=... --dst=...` (`unite_jax.cli.convert`)."""

import sys

from unite_jax.cli.convert import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m unite_jax.convert"))
