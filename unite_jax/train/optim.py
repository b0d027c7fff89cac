"""Optimizer of the UNITE recipe: global-norm clipping, then AdamW on a warmup + cosine schedule.

UNITE.md ("Training recipe"): AdamW, weight decay 0, cosine schedule with 3 %
linear warmup, gradient-norm clip 1.0; learning rate 1e-4 (stage 1) or 2e-5
(stage 2). The original trainer used transformers' AdamW (torch) and
`get_cosine_schedule_with_warmup`; the formulas below reproduce both.

Step counting: optax evaluates the schedule at `count` = the number of updates
already applied, so the first update uses lr(0), exactly like torch's
LambdaLR, which is stepped after each optimizer step (lr(0) = 0 when there is
warmup: the very first update changes nothing but the Adam moments).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax


def warmup_steps(total_steps: int, warmup_fraction: float) -> int:
    """ceil(warmup_fraction * total_steps): how transformers turns warmup_ratio into steps."""
    return int(math.ceil(warmup_fraction * total_steps))


def learning_rate_schedule(peak: float, total_steps: int, warmup_fraction: float = 0.03,
                           end_fraction: float = 0.0) -> optax.Schedule:
    """Linear warmup to `peak`, then cosine decay to end_fraction * peak at `total_steps`.

    With W = ceil(warmup_fraction * total_steps), T = total_steps, end = end_fraction * peak:
        lr(s) = peak * s / W                                               for s < W
        lr(s) = end + (peak - end) * 0.5 * (1 + cos(pi * p)),  p = min(1, (s - W) / max(1, T - W))   otherwise
    So lr(0) = 0 (when W > 0), lr(W) = peak, lr(T) = end, and lr stays at `end` after T (transformers'
    formula would climb again past T). With end_fraction = 0 this is transformers'
    get_cosine_schedule_with_warmup(num_warmup_steps=W, num_training_steps=T). Returns float32.
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
    if not 0.0 <= end_fraction <= 1.0:
        raise ValueError(f"end_fraction must be in [0, 1], got {end_fraction}")
    if not peak >= 0:
        raise ValueError(f"peak learning rate must be >= 0, got {peak}")
    warmup = warmup_steps(total_steps, warmup_fraction)
    decay_steps = max(1, total_steps - warmup)
    peak, end = float(peak), float(end_fraction) * float(peak)

    def schedule(count):
        step = jnp.asarray(count, jnp.float32)
        warm = peak * step / max(1, warmup)
        progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        cosine = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup, warm, cosine).astype(jnp.float32)

    return schedule


def global_norm(tree: Any) -> jax.Array:
    """sqrt of the sum of squares of every leaf, accumulated in float32 (bf16 leaves lose nothing). Scalar."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(jnp.asarray(x).astype(jnp.float32))) for x in leaves))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Scales the updates by min(1, max_norm / global_norm(updates)) (norm in float32).

    Same rule as optax.clip_by_global_norm; torch's clip_grad_norm_ divides by (norm + 1e-6)
    instead, a relative difference of 1e-6 / norm, only when clipping.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        norm = global_norm(updates)
        scale = jnp.where(norm < max_norm, 1.0, max_norm / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny))
        return jax.tree.map(lambda g: (g.astype(jnp.float32) * scale).astype(g.dtype), updates), state

    return optax.GradientTransformation(init, update)


def make_optimizer(peak_lr: float, total_steps: int, *, warmup_fraction: float = 0.03, weight_decay: float = 0.0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, clip_norm: float = 1.0,
                   mask: Optional[Any | Callable[[Any], Any]] = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(global-norm clip, then AdamW on `learning_rate_schedule(peak_lr, total_steps, warmup_fraction)`, schedule).

    AdamW (decoupled weight decay, as torch.optim.AdamW), with lr = schedule(count):
        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  m^ = m / (1 - b1^t);  v^ = v / (1 - b2^t)
        p <- p - lr * (m^ / (sqrt(v^) + eps) + weight_decay * p)
    clip_norm <= 0 disables clipping. mask: optax's weight-decay mask (a tree of bools or a function
    of the params; True = decayed); None decays every leaf (irrelevant at weight_decay = 0).
    """
    schedule = learning_rate_schedule(peak_lr, total_steps, warmup_fraction)
    parts = []
    if clip_norm is not None and clip_norm > 0:
        parts.append(clip_by_global_norm(clip_norm))
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask))
    return optax.chain(*parts), schedule
