"""The jitted functions of a training run, built in one place for the trainer and the AOT checker.

`launch/train.py` runs them on real devices; `launch/aot.py` lowers the very
same functions on abstract arguments for a TPU topology it does not have. So
the state's shardings, the step's closure (model config, loss settings,
optimizer, pixel table) and the activation pins are defined once, here.

Shardings: the whole TrainState follows the parameter partition rules
(`parallel.param_shardings`): trainable leaves by their path, the optimizer's
moments by the parameter path embedded in theirs (".../mu/model/layers/..."),
scalars and the PRNG key replicated. Without explicit out_shardings,
`jax.jit(create_state)` would replicate every optimizer leaf on every device.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import optax
from jax.sharding import Mesh

from unite_jax import parallel
from unite_jax.model.config import ModelConfig
from unite_jax.model.options import RunOptions
from unite_jax.model.sharding import traced_on
from unite_jax.train.state import create_state
from unite_jax.train.step import LossSettings, train_step


def loss_settings(config) -> LossSettings:
    """The loss.* options of a run config."""
    return LossSettings(temperature=config.loss.temperature, modality_mask=config.loss.modality_mask,
                        symmetric=config.loss.symmetric, chunk_size=config.loss.chunk_size, scale=config.loss.scale)


def check_chunk_mode(config) -> None:
    if config.train.chunk_mode not in ("gradcache", "accumulate"):
        raise ValueError(f"train.chunk_mode must be 'gradcache' or 'accumulate', got {config.train.chunk_mode!r}")


def state_shardings(tx: optax.GradientTransformation, abstract_trainable: Any, mesh: Mesh, seed: int = 0) -> Any:
    """TrainState tree of NamedShardings: every leaf by the partition rules of its path."""
    abstract_state = jax.eval_shape(functools.partial(create_state, tx=tx, seed=seed), abstract_trainable)
    return parallel.param_shardings(abstract_state, mesh)


def jit_create_state(tx: optax.GradientTransformation, seed: int, shardings: Any) -> Callable:
    """create_state(trainable) jitted so that the optimizer state is born sharded like its parameters."""
    return jax.jit(functools.partial(create_state, tx=tx, seed=seed), out_shardings=shardings)


def jit_train_step(config, cfg: ModelConfig, run: RunOptions, mesh: Mesh, *, tx: optax.GradientTransformation,
                   schedule: Callable, shardings: Any, pixel_table) -> Callable:
    """step(state, frozen, batch) -> (state, metrics), jitted with the state donated and kept in `shardings`.

    Traced inside `activation_mesh(mesh)`, so every layer's carry stays split over the batch axes.
    """
    check_chunk_mode(config)
    step = functools.partial(train_step, cfg=cfg, run=run, settings=loss_settings(config), tx=tx, schedule=schedule,
                             has_negatives=bool(config.data.hard_negatives),
                             accumulate=config.train.chunk_mode == "accumulate", pixel_table=pixel_table)

    return jax.jit(traced_on(mesh, step), donate_argnums=(0,), out_shardings=(shardings, None))
