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

Sub-batch layout. By default ("strided") sub-batch k holds rows k, k + n,
k + 2n, ... of the batch (n = num_chunks). When the batch axis is sharded
over a mesh's data axes in contiguous blocks, every sub-batch then takes the
same number of rows from every device, so each scan step keeps all devices
busy and needs no resharding; each sub-batch is sliced out of a free
[batch / n, n, ...] reshape inside the loop, so the batch is never copied
whole. With `batch_layout="stacked"` the batch leaves
already carry a leading [num_chunks] axis (for inputs such as packed patches
that cannot be split by rows); embeddings are then concatenated chunk-major
([num_chunks * rows, dim]) and the loss must index its per-row inputs the same way.

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


def _check_layout(batch, num_chunks: int, batch_layout: str, name: str) -> None:
    size = _batch_size(batch, name)
    if batch_layout == "stacked":
        if size != num_chunks:
            raise ValueError(f"{name}: batch_layout='stacked' needs a leading axis of num_chunks={num_chunks}, "
                             f"got {size}")
    elif batch_layout == "strided":
        if size % num_chunks:
            raise ValueError(f"{name}: batch size {size} is not divisible by num_chunks={num_chunks}")
    else:
        raise ValueError(f"batch_layout must be 'strided' or 'stacked', got {batch_layout!r}")


def _chunk_view(tree, num_chunks: int, batch_layout: str):
    """Leaves [batch, ...] -> [batch / num_chunks, num_chunks, ...] (strided; a free reshape, no copy).

    Stacked leaves ([num_chunks, rows, ...]) are returned as they are.
    """
    if batch_layout == "stacked":
        return tree
    return jax.tree.map(lambda x: x.reshape((x.shape[0] // num_chunks, num_chunks) + x.shape[1:]), tree)


def _rows_view(rows, num_chunks: int, batch_layout: str):
    """[batch, dim] embeddings or cotangents -> the `_chunk_view` of their sub-batches (a free reshape).

    Stacked sub-batches were merged chunk-major, so they are [num_chunks, rows, dim] again.
    """
    if batch_layout == "stacked":
        return rows.reshape((num_chunks, -1) + rows.shape[1:])
    return _chunk_view(rows, num_chunks, batch_layout)


def _take_chunk(view, index, batch_layout: str):
    """Sub-batch `index` of a `_chunk_view`: leaves [rows, ...].

    Slicing inside the loop copies one sub-batch at a time; transposing the whole
    batch to chunk-major order up front would copy all of it.
    """
    axis = 0 if batch_layout == "stacked" else 1
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, index, axis=axis, keepdims=False), view)


def _merge_chunks(per_chunk, batch_layout: str):
    """[num_chunks, rows, dim] embeddings -> [num_chunks * rows, dim] in batch order."""
    if batch_layout == "strided":
        per_chunk = jnp.swapaxes(per_chunk, 0, 1)
    return per_chunk.reshape((-1,) + per_chunk.shape[2:])


def _embedder(embed_fn: Callable, remat: bool):
    """embed(params, sub_batch, key_or_None) -> [rows, dim], optionally rematerialised."""
    def embed(params, sub_batch, key):
        return embed_fn(params, sub_batch) if key is None else embed_fn(params, sub_batch, key)

    return jax.checkpoint(embed) if remat else embed


def _embed_all(embed, params, view, keys, num_chunks: int, batch_layout: str):
    """(a): all sub-batches without gradient -> [batch, dim]; one sub-batch's activations at a time."""
    frozen = jax.lax.stop_gradient(params)

    def one(step):
        index, key = step
        return embed(frozen, _take_chunk(view, index, batch_layout), key)

    # None keys (no rng) are an empty pytree: map and scan hand them to the body as None.
    per_chunk = jax.lax.map(one, (jnp.arange(num_chunks), keys))
    return _merge_chunks(per_chunk, batch_layout)


def embed_in_chunks(embed_fn: Callable, params, batch, *, num_chunks: int, rng=None, batch_layout: str = "strided",
                    stream: int = QUERY_STREAM):
    """Embeddings [batch, dim] of `batch`, computed `num_chunks` sub-batches at a time, without gradient.

    With rng, sub-batch k uses the same key as `gradcache_value_and_grad` gives it in `stream`.
    """
    _check_layout(batch, num_chunks, batch_layout, "batch")
    keys = None if rng is None else chunk_rngs(rng, num_chunks)[stream]
    view = _chunk_view(batch, num_chunks, batch_layout)
    return _embed_all(_embedder(embed_fn, False), params, view, keys, num_chunks, batch_layout)


def _widen(x):
    # Accumulate low-precision gradients in float32 so summing many sub-batches does not lose bits.
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def gradcache_value_and_grad(embed_fn: Callable, loss_fn: Callable, params, query_batch, candidate_batch, *,
                             num_chunks: int, rng=None, has_aux: bool = True, batch_layout: str = "strided",
                             remat: bool = False) -> tuple[Any, Any, Any]:
    """Loss, aux and exact parameter gradients of loss_fn(embed(query_batch), embed(candidate_batch)).

    Args:
      embed_fn: embed_fn(params, sub_batch) -> [rows, dim], or embed_fn(params, sub_batch, rng) when rng is
        given; pure; close over frozen weights and static structure (configs, meshes) as needed.
      loss_fn: loss_fn(query_embeddings [Bq, dim], candidate_embeddings [Bc, dim]) -> (loss, aux) when
        has_aux, else loss. It may close over per-row data (modality codes, valid) in batch order.
      params: the float pytree to differentiate (e.g. LoRA weights).
      query_batch, candidate_batch: pytrees with leaves [batch, ...] (or [num_chunks, ...] when stacked).
      num_chunks: sub-batches per side; the activation memory is that of batch / num_chunks rows.
      rng: optional PRNG key; sub-batch k of each side uses the key given by `chunk_rngs(rng, num_chunks)`
        in both passes, so dropout is identical and the gradient exact.
      batch_layout: "strided" (default) or "stacked"; see the module docstring.
      remat: wrap embed_fn in jax.checkpoint inside the gradient pass (see the module docstring).
    Returns:
      (loss, aux, grads): aux is None when has_aux is False; grads has the structure and dtypes of params.
    """
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
        raise ValueError(f"num_chunks must be a positive int, got {num_chunks!r}")
    embed = _embedder(embed_fn, remat)
    _check_layout(query_batch, num_chunks, batch_layout, "query_batch")
    _check_layout(candidate_batch, num_chunks, batch_layout, "candidate_batch")
    query_view = _chunk_view(query_batch, num_chunks, batch_layout)
    candidate_view = _chunk_view(candidate_batch, num_chunks, batch_layout)
    query_keys, candidate_keys = (None, None) if rng is None else chunk_rngs(rng, num_chunks)

    # (a) embeddings without activations.
    query_embeddings = _embed_all(embed, params, query_view, query_keys, num_chunks, batch_layout)
    candidate_embeddings = _embed_all(embed, params, candidate_view, candidate_keys, num_chunks, batch_layout)

    # (b) the gradient cache: d loss / d embeddings.
    loss_of_embeddings = loss_fn if has_aux else (lambda q, c: (loss_fn(q, c), None))
    (loss, aux), (query_cotangent, candidate_cotangent) = jax.value_and_grad(
        loss_of_embeddings, argnums=(0, 1), has_aux=True)(query_embeddings, candidate_embeddings)
    query_cotangent = _rows_view(query_cotangent, num_chunks, batch_layout)
    candidate_cotangent = _rows_view(candidate_cotangent, num_chunks, batch_layout)

    # (c) re-embed each sub-batch with gradient and pull the cached cotangents back to params.
    def accumulate(grads, step):
        index, query_key, candidate_key = step
        query_chunk = _take_chunk(query_view, index, batch_layout)
        candidate_chunk = _take_chunk(candidate_view, index, batch_layout)
        cotangents = (_take_chunk(query_cotangent, index, batch_layout),
                      _take_chunk(candidate_cotangent, index, batch_layout))
        _, pullback = jax.vjp(lambda p: (embed(p, query_chunk, query_key), embed(p, candidate_chunk, candidate_key)),
                              params)
        (step_grads,) = pullback(cotangents)
        return jax.tree.map(lambda total, g: total + _widen(g), grads, step_grads), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), params)
    grads, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(num_chunks), query_keys, candidate_keys))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return loss, (aux if has_aux else None), grads
