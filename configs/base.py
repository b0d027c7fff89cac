"""The packaged `unite_jax/configs/base.py` (edit that one): every key of both stages, presets 2b, 7b, tiny."""

from unite_jax.configs.base import PRESETS, get_config  # noqa: F401
