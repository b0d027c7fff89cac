"""`python -m unite_jax.train --config=... --workdir=...`: the trainer's command line (`unite_jax.cli.train`)."""

from unite_jax.cli.train import main

if __name__ == "__main__":  # Grain's worker processes re-import this module: the guard keeps them out
    main()
