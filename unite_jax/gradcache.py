"""GradCache: exact contrastive gradients for a batch whose activations do not fit at once.

A contrastive loss couples every example of the batch, so the batch cannot be
split into independent micro-batches with gradient accumulation. GradCache
(Gao et al., 2021) splits the work instead:

  (a) embed the whole batch in `num_chunks` sub-batches with no gradient
      (`lax.map`: only one sub-batch's activations are alive at a time) and
      keep just the embeddings [batch, dim];
  (b) differentiate the loss with respect to the embeddings only
      (cheap: [batch, dim] cotangents, the "gradient cache");
  (c) re-run each sub-batch under `jax.vjp` inside a `lax.scan` and pull its
      cached embedding cotangents back to the parameters, summing over
      sub-batches.

By the chain rule the result equals the full-batch gradient exactly, provided
each sub-batch is embedded identically in (a) and (c). Dropout therefore gets
one key per sub-batch, used in both passes (see `chunk_rngs`).

Sub-batches. Every leaf of a batch carries a leading [num_chunks] axis: sub-batch k
is `leaf[k]`, and embeddings are concatenated chunk-major ([num_chunks * rows, dim]),
so the loss must index its per-row inputs (modality codes, valid) in that order. The
trainer's packed batches come this way (each chunk packs its own patches, so a
packed batch cannot be split by rows afterwards). Each sub-batch is sliced out of
the stack inside the loop, so the batch is never copied whole.

Memory. Peak memory is one sub-batch's activations plus the embeddings, their
cotangents, the loss's own working set (use `mamcl_loss(..., chunk_size=N)` to
keep it at [batch, N]) and the parameter gradient accumulator.
`remat=True` wraps the embed function in `jax.checkpoint`; it is off by default
because the vjp in (c) is consumed in the same scan step, so rematerialising
only adds a third forward pass without lowering the peak (measured in
benchmarks/loss.py); per-layer remat inside the model is what lowers the
per-sub-batch activation memory.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

# Stream ids folded into the step key so queries and candidates get independent dropout.
QUERY_STREAM = 0
CANDIDATE_STREAM = 1


def chunk_rngs(rng, num_chunks: int):
    """Per-sub-batch dropout keys: (query keys, candidate keys), each [num_chunks] keys.

    query key k = fold_in(fold_in(rng, 0), k); candidate key k = fold_in(fold_in(rng, 1), k).
    """
    def stream(stream_id):
        base = jax.random.fold_in(rng, stream_id)
        return jax.vmap(lambda k: jax.random.fold_in(base, k))(jnp.arange(num_chunks, dtype=jnp.uint32))

    return stream(QUERY_STREAM), stream(CANDIDATE_STREAM)


def _batch_size(batch, name: str) -> int:
    """The shared leading size of every leaf of `batch`; raises when there is none."""
    leaves = jax.tree.leaves(batch)
    if not leaves or any(jnp.ndim(x) == 0 for x in leaves):
        raise ValueError(f"{name} must be a non-empty pytree of arrays with a leading batch axis (no scalars)")
    sizes = sorted({x.shape[0] for x in leaves})
    if len(sizes) != 1:
        raise ValueError(f"{name}: the leaves disagree on the leading batch size: {sizes}")
    return sizes[0]


def _check_chunks(batch, num_chunks: int, name: str) -> None:
    size = _batch_size(batch, name)
    if size != num_chunks:
        raise ValueError(f"{name}: the leaves need a leading axis of num_chunks={num_chunks} (one sub-batch "
                         f"each), got {size}")


def _take_chunk(stack, index):
    """Sub-batch `index` of a [num_chunks, ...] stack: leaves [rows, ...] (one sub-batch copied at a time)."""
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, index, axis=0, keepdims=False), stack)


def _embedder(embed_fn: Callable, remat: bool):
    """embed(params, sub_batch, key_or_None) -> [rows, dim], optionally rematerialised."""
    def embed(params, sub_batch, key):
        return embed_fn(params, sub_batch) if key is None else embed_fn(params, sub_batch, key)

    return jax.checkpoint(embed) if remat else embed


def _embed_all(embed, params, stack, keys, num_chunks: int):
    """(a): all sub-batches without gradient -> [num_chunks * rows, dim]; one sub-batch's activations at a time."""
    frozen = jax.lax.stop_gradient(params)

    def one(step):
        index, key = step
        return embed(frozen, _take_chunk(stack, index), key)

    # None keys (no rng) are an empty pytree: map and scan hand them to the body as None.
    per_chunk = jax.lax.map(one, (jnp.arange(num_chunks), keys))
    return per_chunk.reshape((-1,) + per_chunk.shape[2:])


def embed_in_chunks(embed_fn: Callable, params, batch, *, num_chunks: int, rng=None, stream: int = QUERY_STREAM):
    """Embeddings [num_chunks * rows, dim] of a [num_chunks, ...] batch, one sub-batch at a time, without gradient.

    This is GradCache's pass (a). With rng, sub-batch k uses the key `gradcache_value_and_grad` gives it in
    `stream`.
    """
    _check_chunks(batch, num_chunks, "batch")
    keys = None if rng is None else chunk_rngs(rng, num_chunks)[stream]
    return _embed_all(_embedder(embed_fn, False), params, batch, keys, num_chunks)


def _widen(x):
    # Accumulate low-precision gradients in float32 so summing many sub-batches does not lose bits.
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def gradcache_value_and_grad(embed_fn: Callable, loss_fn: Callable, params, query_batch, candidate_batch, *,
                             num_chunks: int, rng=None, has_aux: bool = True,
                             remat: bool = False) -> tuple[Any, Any, Any]:
    """Loss, aux and exact parameter gradients of loss_fn(embed(query_batch), embed(candidate_batch)).

    Args:
      embed_fn: embed_fn(params, sub_batch) -> [rows, dim], or embed_fn(params, sub_batch, rng) when rng is
        given; pure; close over frozen weights and static structure (configs, meshes) as needed.
      loss_fn: loss_fn(query_embeddings [C*rows, dim], candidate_embeddings [C*rows, dim]) -> (loss, aux) when
        has_aux, else loss, embeddings chunk-major. It may close over per-row data (modality codes, valid)
        in that order.
      params: the float pytree to differentiate (e.g. LoRA weights).
      query_batch, candidate_batch: pytrees with leaves [num_chunks, ...] (sub-batch k = leaf[k]).
      num_chunks: sub-batches per side; the activation memory is that of one sub-batch.
      rng: optional PRNG key; sub-batch k of each side uses the key given by `chunk_rngs(rng, num_chunks)`
        in both passes, so dropout is identical and the gradient exact.
      remat: wrap embed_fn in jax.checkpoint inside the gradient pass (see the module docstring).
    Returns:
      (loss, aux, grads): aux is None when has_aux is False; grads has the structure and dtypes of params.
    """
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
        raise ValueError(f"num_chunks must be a positive int, got {num_chunks!r}")
    embed = _embedder(embed_fn, remat)
    _check_chunks(query_batch, num_chunks, "query_batch")
    _check_chunks(candidate_batch, num_chunks, "candidate_batch")
    query_keys, candidate_keys = (None, None) if rng is None else chunk_rngs(rng, num_chunks)

    # (a) embeddings without activations.
    query_embeddings = _embed_all(embed, params, query_batch, query_keys, num_chunks)
    candidate_embeddings = _embed_all(embed, params, candidate_batch, candidate_keys, num_chunks)

    # (b) the gradient cache: d loss / d embeddings, back in sub-batches [num_chunks, rows, dim].
    loss_of_embeddings = loss_fn if has_aux else (lambda q, c: (loss_fn(q, c), None))
    (loss, aux), (query_cotangent, candidate_cotangent) = jax.value_and_grad(
        loss_of_embeddings, argnums=(0, 1), has_aux=True)(query_embeddings, candidate_embeddings)
    query_cotangent = query_cotangent.reshape((num_chunks, -1) + query_cotangent.shape[1:])
    candidate_cotangent = candidate_cotangent.reshape((num_chunks, -1) + candidate_cotangent.shape[1:])

    # (c) re-embed each sub-batch with gradient and pull the cached cotangents back to params.
    def accumulate(grads, step):
        index, query_key, candidate_key = step
        query_chunk = _take_chunk(query_batch, index)
        candidate_chunk = _take_chunk(candidate_batch, index)
        cotangents = (_take_chunk(query_cotangent, index), _take_chunk(candidate_cotangent, index))
        _, pullback = jax.vjp(lambda p: (embed(p, query_chunk, query_key), embed(p, candidate_chunk, candidate_key)),
                              params)
        (step_grads,) = pullback(cotangents)
        return jax.tree.map(lambda total, g: total + _widen(g), grads, step_grads), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), params)
    grads, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(num_chunks), query_keys, candidate_keys))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return loss, (aux if has_aux else None), grads
