"""The train state: what changes every step and goes into every checkpoint.

The frozen base parameters are not part of it: they are re-read from
`model.init` on resume (with LoRA, checkpoints hold only the adapters).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """step: int32 scalar (optimizer steps done); trainable: LoRA pairs or full parameters;
    opt_state: optax state of `trainable`; rng: uint32 [2] raw PRNG key (dropout keys are
    fold_in(rng, step), so a resumed run draws the same masks)."""

    step: jnp.ndarray
    trainable: Any
    opt_state: Any
    rng: jnp.ndarray


def create_state(trainable: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """Step 0 state (call under jit with out_shardings to place it)."""
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=tx.init(trainable),
                      rng=jax.random.PRNGKey(seed))
