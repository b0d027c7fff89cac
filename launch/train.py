"""Trains one UNITE stage; reruns of the same command resume from the newest checkpoint.

    python launch/train.py --config=configs/stage1.py:tiny --workdir=runs/stage1
    python launch/train.py --config=configs/stage2.py:tiny --workdir=runs/stage2 --config.model.init=runs/stage1

Any config key can be overridden: --config.train.steps=200 --config.data.train=a.json@2,b.jsonl

The program is `unite_jax.cli.train` (also installed as `unite-train`; `python -m unite_jax.train`).
"""

from unite_jax.cli.train import main

if __name__ == "__main__":  # Grain's worker processes re-import this module: the guard keeps them out
    main()
