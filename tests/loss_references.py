"""References the tests hold the library to (moved here from the library, which does not need them).

- `mamcl_loss_sharded`: MAMCL as an explicit `jax.shard_map` over the mesh's batch axes, from the loss's
  own building blocks: each device all-gathers the candidates (with modality and validity; the
  queries too when symmetric), computes the rows of its own queries against all columns (its
  positives sit at global columns offset + arange(B_local)), and the loss is a psum of per-row sums
  divided by the psum of valid rows. The trainer relies on `jax.jit` partitioning `mamcl_loss`; the
  tests check that both give the single-device loss and gradients.
- `strided_gradcache_value_and_grad`: GradCache over a flat [batch, ...] batch whose sub-batch k holds
  rows k, k + n, k + 2n, ... (n = num_chunks): built on the library's stacked form, with the embeddings
  put back in batch order before the loss sees them.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from unite_jax import gradcache, loss


def mamcl_loss_sharded(query, candidate, candidate_modality, *, mesh, axis_names: Sequence[str] = ("data",),
                       temperature=0.03, modality_mask=True, symmetric=False, hard_negative=None,
                       hard_negative_modality=None, valid=None, chunk_size=None):
    """`mamcl_loss` as an explicit `jax.shard_map` over the batch axes `axis_names` of `mesh`.

    The leading (batch) axis of every input is split over `axis_names` (in that
    order, as PartitionSpec((*axis_names,))); other mesh axes see replicated
    copies. Each device gathers all candidates, computes its own rows against
    them (chunked when chunk_size is set: [batch / shards, N] logits at a time),
    and the loss is psum(row-loss sums) / psum(valid rows). Same arguments and
    results as `mamcl_loss`; batch must be divisible by the number of shards.
    """
    config = loss._check_config(temperature, modality_mask, symmetric, chunk_size)
    inputs = loss._prepare_inputs(query, candidate, candidate_modality, hard_negative, hard_negative_modality, valid)
    axis_names = tuple(axis_names)
    unknown = [a for a in axis_names if a not in mesh.shape]
    if not axis_names or unknown:
        raise ValueError(f"axis_names {axis_names} must be non-empty axes of the mesh {dict(mesh.shape)}")
    shards = math.prod(mesh.shape[a] for a in axis_names)
    batch = inputs.query.shape[0]
    if batch % shards:
        raise ValueError(f"batch {batch} is not divisible by the {shards} shards of mesh axes {axis_names}")
    loss._maybe_debug_check(inputs)
    arrays = {k: v for k, v in inputs._asdict().items() if v is not None}

    def body(local_arrays):
        local = loss._Inputs(**{k: local_arrays.get(k) for k in loss._Inputs._fields})

        def gather(x):
            # The transpose of this gather is a reduce-scatter: cross-device gradient terms come home.
            return jax.lax.all_gather(x, axis_names, axis=0, tiled=True)

        hard_negative_all = None if local.hard_negative is None else gather(local.hard_negative)
        hard_negative_modality_all = None if local.hard_negative is None else gather(local.hard_negative_modality)
        valid_all = gather(local.valid)
        columns = loss._candidate_columns(gather(local.candidate), gather(local.modality), valid_all, hard_negative_all,
                                     hard_negative_modality_all)
        query_columns = None
        if config.symmetric:
            query_columns = loss._Columns(gather(local.query), jnp.zeros((batch,), jnp.int32), valid_all)
        row_offset = jax.lax.axis_index(axis_names) * local.query.shape[0]
        sums = loss._loss_sums(local, columns, query_columns, row_offset.astype(jnp.int32), config)
        sums = jax.lax.psum(sums, axis_names)
        return loss._finalise(sums, config)

    batch_spec = PartitionSpec(axis_names)
    sharded = jax.shard_map(body, mesh=mesh, in_specs=(batch_spec,), out_specs=PartitionSpec(), check_vma=True)
    return sharded(arrays)


def strided_chunks(tree, num_chunks: int):
    """Leaves [batch, ...] -> [num_chunks, batch / num_chunks, ...] with sub-batch k = rows k::num_chunks."""
    def one(x):
        if x.shape[0] % num_chunks:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by num_chunks={num_chunks}")
        return jnp.swapaxes(x.reshape((x.shape[0] // num_chunks, num_chunks) + x.shape[1:]), 0, 1)

    return jax.tree.map(one, tree)


def batch_order(embeddings, num_chunks: int):
    """Chunk-major embeddings [num_chunks * rows, dim] of `strided_chunks` -> batch order [batch, dim]."""
    return jnp.swapaxes(embeddings.reshape((num_chunks, -1) + embeddings.shape[1:]), 0, 1).reshape(embeddings.shape)


def strided_gradcache_value_and_grad(embed_fn, loss_fn, params, query_batch, candidate_batch, *, num_chunks: int,
                                     rng=None, has_aux: bool = True, remat: bool = False):
    """`gradcache.gradcache_value_and_grad` on flat batches split into strided sub-batches; loss_fn sees batch order."""
    def in_batch_order(q, c):
        return loss_fn(batch_order(q, num_chunks), batch_order(c, num_chunks))

    return gradcache.gradcache_value_and_grad(
        embed_fn, in_batch_order, params, strided_chunks(query_batch, num_chunks),
        strided_chunks(candidate_batch, num_chunks), num_chunks=num_chunks, rng=rng, has_aux=has_aux, remat=remat)


def strided_embed_in_chunks(embed_fn, params, batch, *, num_chunks: int, rng=None,
                            stream: int = gradcache.QUERY_STREAM):
    """`gradcache.embed_in_chunks` of a flat batch in strided sub-batches, in batch order."""
    return batch_order(gradcache.embed_in_chunks(embed_fn, params, strided_chunks(batch, num_chunks),
                                                 num_chunks=num_chunks, rng=rng, stream=stream), num_chunks)
