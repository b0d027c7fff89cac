"""Compiles the train step for a Cloud TPU topology on this machine and says whether it fits per chip.

    python launch/aot.py --config=configs/stage1.py:2b --topology=v5e:4x4 [--find_chunks] [--fast]

The program is `unite_jax.cli.aot` (also installed as `unite-aot`).
"""

from unite_jax.cli.aot import main

if __name__ == "__main__":
    main()
