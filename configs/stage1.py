"""`--config=configs/stage1.py[:PRESET]`: the packaged config `unite_jax/configs/stage1.py` (edit that one)."""

from unite_jax.configs.stage1 import get_config  # noqa: F401
