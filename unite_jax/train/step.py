"""One optimisation step: embed queries and candidates, MAMCL / InfoNCE over the global batch, AdamW.

The batch is the pipeline's layout (unite_jax/data/pipeline.py) as global arrays:
every stream (`query`, `candidate`, optional `negative`) holds the embedder's
BATCH_KEYS with a leading chunk axis C; axis 1 (rows, or shards for the packed
patches) is split over the mesh's batch axes. Row order is chunk-major, and the
per-row `candidate_modality` [C, rows] follows the same order, so reshaping
[C, rows] -> [C * rows] lines codes up with embeddings.

C == 1: one forward and backward over the whole batch.
C > 1: GradCache (unite_jax/gradcache.py, one sub-batch per chunk): the exact
full-batch gradient with the activation memory of one chunk.

The trainable tree is either LoRA (A, B) pairs, with the frozen base passed
alongside (never copied: `with_lora` only rebuilds dicts) and `run.lora` set, or
every parameter the embedding uses (lora.rank = 0, `run.lora` None).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from unite_jax.data.packing import BATCH_KEYS
from unite_jax.gradcache import gradcache_value_and_grad
from unite_jax.loss import mamcl_loss
from unite_jax.model.config import ModelConfig
from unite_jax.model.embedder import embed
from unite_jax.model.lora import with_lora
from unite_jax.model.options import RunOptions
from unite_jax.model.pixels import normalize_stream
from unite_jax.train.optim import global_norm
from unite_jax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """Static loss options (hashable: part of the jitted step's closure)."""

    temperature: float = 0.03
    modality_mask: bool = True
    symmetric: bool = False
    chunk_size: int = 0  # 0 = dense logits; N = stream N candidate columns at a time
    # The original trainer computes the global loss on every rank and lets DDP average over R ranks,
    # which scales its gradient by 1/R; 1.0 keeps the exact gradient of the loss (see loss.py).
    scale: float = 1.0


def full_params(frozen: dict, trainable: dict, run: RunOptions) -> dict:
    """The parameter tree the forward sees: base + LoRA leaves (`run.lora` set), or the trainable tree over the
    frozen rest."""
    if run.lora is not None:
        return with_lora(frozen, trainable)
    return {**frozen, **trainable}


def _stream(batch: dict, name: str) -> dict:
    return {key: batch[name][key] for key in BATCH_KEYS}


def _sides(batch: dict, has_negatives: bool) -> tuple[dict, dict]:
    """The query and candidate sub-batches of embed_fn: {"main": stream} (+ "negative" on the candidate side)."""
    query = {"main": _stream(batch, "query")}
    candidate = {"main": _stream(batch, "candidate")}
    if has_negatives:
        candidate["negative"] = _stream(batch, "negative")
    return query, candidate


def make_loss_fn(batch: dict, settings: LossSettings, has_negatives: bool) -> Callable:
    """loss_fn(query_embeddings [C*R, D], candidate_embeddings) -> (loss, metrics) for this batch.

    With hard negatives the candidate side is embedded per chunk as [positives; negatives]
    ([C, 2, R, D] chunk-major); the loss splits it back.
    """
    num_chunks, rows = batch["candidate_modality"].shape
    modality = batch["candidate_modality"].reshape(-1)
    valid = batch["valid"].reshape(-1)
    negative_modality = batch["negative_modality"].reshape(-1) if has_negatives else None

    def loss_fn(query_embeddings, candidate_embeddings):
        hard_negative = None
        if has_negatives:
            pairs = candidate_embeddings.reshape(num_chunks, 2, rows, -1)
            candidate_embeddings = pairs[:, 0].reshape(num_chunks * rows, -1)
            hard_negative = pairs[:, 1].reshape(num_chunks * rows, -1)
        loss, metrics = mamcl_loss(
            query_embeddings, candidate_embeddings, modality, temperature=settings.temperature,
            modality_mask=settings.modality_mask, symmetric=settings.symmetric, hard_negative=hard_negative,
            hard_negative_modality=negative_modality, valid=valid, chunk_size=settings.chunk_size or None)
        return loss * settings.scale, metrics

    return loss_fn


def make_embed_fn(frozen: dict, cfg: ModelConfig, run: RunOptions, pixel_table=None) -> Callable:
    """embed_fn(trainable, sub_batch, key) -> [rows (x2 with negatives), D] for GradCache and the plain path.

    A sub-batch is {"main": stream} or {"main": stream, "negative": stream}; the negatives get their own
    dropout key. pixel_table (float32 [3, 256]) normalises streams whose patches are uint8 levels.
    """
    def embed_stream(params, stream, key):
        return embed(params, normalize_stream(stream, pixel_table), cfg, run, key)

    def embed_fn(trainable, sub_batch, key=None):  # GradCache passes no key when there is no dropout
        params = full_params(frozen, trainable, run)
        main = embed_stream(params, sub_batch["main"], key)
        if "negative" not in sub_batch:
            return main
        negative_key = None if key is None else jax.random.fold_in(key, 1)
        return jnp.concatenate([main, embed_stream(params, sub_batch["negative"], negative_key)], axis=0)

    return embed_fn


def _accumulated(trainable: dict, embed_fn: Callable, batch: dict, dropout, *, settings: LossSettings,
                 has_negatives: bool) -> tuple[jnp.ndarray, dict, dict]:
    """Plain gradient accumulation: each chunk is its own contrastive batch (negatives only from within
    the chunk), loss and gradients averaged over chunks. Cheaper than GradCache (no second forward) but
    a different objective: fewer negatives per query."""
    num_chunks = batch["candidate_modality"].shape[0]
    per_chunk = {key: value for key, value in batch.items() if key in ("candidate_modality", "negative_modality",
                                                                        "valid")}
    streams = {name: _stream(batch, name) for name in ("query", "candidate", "negative") if name in batch}

    def one(grads_sum, index):
        chunk = jax.tree.map(lambda x: x[index][None], {**streams, **per_chunk})
        key = None if dropout is None else jax.random.fold_in(dropout, index)
        loss, metrics, grads = loss_and_grads_single(trainable, embed_fn, chunk, key, settings, has_negatives)
        grads_sum = jax.tree.map(lambda total, g: total + g.astype(total.dtype), grads_sum, grads)
        return grads_sum, (loss, metrics)

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), trainable)
    grads, (losses, metrics) = jax.lax.scan(one, zeros, jnp.arange(num_chunks))
    grads = jax.tree.map(lambda g, p: (g / num_chunks).astype(p.dtype), grads, trainable)
    return losses.mean(), jax.tree.map(lambda m: m.mean(), metrics), grads


def loss_and_grads_single(trainable: dict, embed_fn: Callable, batch: dict, dropout, settings: LossSettings,
                          has_negatives: bool) -> tuple[jnp.ndarray, dict, dict]:
    """(loss, metrics, grads) of a batch with one chunk, in one forward and backward pass."""
    loss_fn = make_loss_fn(batch, settings, has_negatives)
    query, candidate = _sides(batch, has_negatives)
    query_key = candidate_key = None
    if dropout is not None:
        query_key, candidate_key = jax.random.fold_in(dropout, 0), jax.random.fold_in(dropout, 1)

    def total(trainable):
        q = embed_fn(trainable, jax.tree.map(lambda x: x[0], query), query_key)
        # with negatives, one chunk's [positives; negatives] is already the chunk-major layout
        c = embed_fn(trainable, jax.tree.map(lambda x: x[0], candidate), candidate_key)
        return loss_fn(q, c)

    (loss, metrics), grads = jax.value_and_grad(total, has_aux=True)(trainable)
    return loss, metrics, grads


def loss_and_grads(trainable: dict, frozen: dict, batch: dict, rng, *, cfg: ModelConfig, run: RunOptions,
                   settings: LossSettings, has_negatives: bool, accumulate: bool = False,
                   pixel_table=None) -> tuple[jnp.ndarray, dict, dict]:
    """(loss, metrics, grads w.r.t. trainable) for one global batch.

    C > 1 chunks: GradCache (the exact gradient of the loss over the whole batch), or with accumulate=True
    plain gradient accumulation (each chunk its own contrastive batch). pixel_table: see make_embed_fn."""
    num_chunks = batch["candidate_modality"].shape[0]
    embed_fn = make_embed_fn(frozen, cfg, run, pixel_table)
    loss_fn = make_loss_fn(batch, settings, has_negatives)
    query, candidate = _sides(batch, has_negatives)
    dropout = rng if run.lora is not None and run.lora.dropout > 0 else None
    if num_chunks > 1 and accumulate:
        return _accumulated(trainable, embed_fn, batch, dropout, settings=settings, has_negatives=has_negatives)
    if num_chunks > 1:
        loss, metrics, grads = gradcache_value_and_grad(embed_fn, loss_fn, trainable, query, candidate,
                                                        num_chunks=num_chunks, rng=dropout)
        return loss, metrics, grads
    return loss_and_grads_single(trainable, embed_fn, batch, dropout, settings, has_negatives)


def train_step(state: TrainState, frozen: dict, batch: dict, *, cfg: ModelConfig, run: RunOptions,
               settings: LossSettings, tx: optax.GradientTransformation, schedule: Callable, has_negatives: bool,
               accumulate: bool = False, pixel_table=None) -> tuple[TrainState, dict[str, Any]]:
    """One AdamW step; a non-finite loss or gradient leaves the state unchanged (metrics["finite"] = 0).

    pixel_table: float32 [3, 256] (`media.normalize_table(processor)`), needed when the batch's patches
    are uint8 pixel levels (data.patch_dtype="uint8"); a constant of the compiled step."""
    step_rng = jax.random.fold_in(state.rng, state.step)
    loss, metrics, grads = loss_and_grads(state.trainable, frozen, batch, step_rng, cfg=cfg, run=run,
                                          settings=settings, has_negatives=has_negatives, accumulate=accumulate,
                                          pixel_table=pixel_table)
    grad_norm = global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.trainable)
    new_trainable = optax.apply_updates(state.trainable, updates)
    # Never apply a non-finite update: the state (and so the next checkpoint) stays the last good one.
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    new_state = state.replace(
        step=state.step + 1,
        trainable=jax.tree.map(keep, new_trainable, state.trainable),
        opt_state=jax.tree.map(keep, new_opt_state, state.opt_state),
    )
    out = {key: value.astype(jnp.float32) for key, value in metrics.items()}
    out.update(loss=loss.astype(jnp.float32), grad_norm=grad_norm.astype(jnp.float32),
               learning_rate=jnp.asarray(schedule(state.step), jnp.float32), finite=finite.astype(jnp.float32))
    return new_state, out
