"""`--config=configs/stage2.py[:PRESET]`: the packaged config `unite_jax/configs/stage2.py` (edit that one)."""

from unite_jax.configs.stage2 import get_config  # noqa: F401
