"""Modal-Aware Masked Contrastive Learning (MAMCL): dense and chunked forms, exact over the global batch.

The loss (UNITE.md, "Loss")
---------------------------
For a global batch of B query/positive pairs with L2-normalised embeddings
q_i, c_i ([batch, dim]) and target-modality codes m_i (`unite_jax.modality`: text 1,
image 2, video 4, OR-ed for fused inputs: 3 = text+image, 5 = text+video):

    S[i, j]  = q_i . col_j / temperature                  (float32, or wider)
    allowed  = (modality(col_j) == m_i  and col_j valid)  or  col_j is c_i
    L(q->c)  = mean over valid rows i of  logsumexp_{j allowed} S[i, j] - S[i, i]

Disallowed logits act as -inf (a `where` selects -1e9, so they get exactly zero
gradient). `modality_mask=False` drops the modality condition (plain InfoNCE).

Columns. The columns are the B positives followed by every hard negative of
the batch, flattened row-major: `concat(c, hard_negative.reshape(B * K, dim))`.
Every query therefore sees every row's hard negatives, as the original UNITE
trainer did (it formed `q @ concat(c, negatives)^T` over the gathered batch).
Hard-negative columns follow the same modality rule as positives (their code
must equal the row's target code). This is a deliberate difference: the
original masked only the positive block and left its hard-negative block
unmasked (its published recipe had hard negatives off). A hard negative of a
padding row is padding too.

Symmetric term. `symmetric=True` returns (L(q->c) + L(c->q)) / 2, where L(c->q)
uses the B positives as rows and the B queries as columns over the UNMASKED
matrix (only padding is excluded); hard negatives are not rows of that term
(they have no target query). The original switched its symmetric term off
whenever hard negatives were on; here the two combine.

Padding. `valid` ([batch] bool) marks real rows. A padding row is neither a
query (weight 0) nor a column (never a negative, in either direction). The
loss is the mean over valid rows; with no valid row it is 0.

Chunked form. `chunk_size=N` computes the same loss and gradients blockwise
over the columns with a streaming logsumexp. A `jax.custom_vjp` forward keeps
only the per-row logsumexp; the backward recomputes each [rows, N] block of
logits inside a `lax.scan`, so neither pass holds more than one block of
logits. N need not divide the column count (the last block is padded with
invalid columns).

Global batch on a mesh
----------------------
`mamcl_loss` is an ordinary jittable function: with `query` / `candidate`
sharded over the data axes of a mesh, `jax.jit` partitions the [B, B] matrix
(XLA gathers the candidates across devices) and the result is the single-device
loss over the whole batch, with the same gradients. The trainer relies on this;
the tests check it against an explicit `jax.shard_map` form (each device
all-gathers the candidates and computes its own rows: tests/loss_references.py).

Gradient scale versus the original PyTorch trainer
--------------------------------------------------
The original UNITE trainer (unite/train/trainer.py, `compute_loss`) all-gathers
BOTH queries and candidates on every rank, puts its own local tensors back into
its slice (so autograd reaches them), and computes the FULL global loss
L = (1/B) sum_i l_i on every rank. Rank r's backward therefore yields the exact
partial derivatives dL/dq_i and dL/dc_j for its own rows (cross-rank terms
included, since every rank holds all rows), and nothing for other ranks'
embeddings (their gathered copies carry no gradient). Summed over ranks these
partial gradients give exactly dL/dtheta; DDP then AVERAGES over the R ranks:

    original gradient = (1/R) * dL/dtheta,     same loss value L.

Ours is the exact gradient of the mean over all valid global rows, dL/dtheta,
with no 1/R factor (`all_gather` in `jax.shard_map` transposes to a
reduce-scatter, so every cross-device term is counted once). To reproduce the
original run on a mesh standing in for R GPUs, multiply the loss by 1/R (R = 8
for the published 2B runs, 64 for 7B). With plain SGD that equals dividing the
learning rate by R; with AdamW the update is nearly invariant to a constant
gradient scale, but the grad-norm clip (1.0) and epsilon are not, so scaling
the loss (or clipping at R * 1.0) is what reproduces the original exactly. The
loss value itself needs no change. With padding rows the original has no
counterpart (it never padded); our mean is over valid rows only.

Also unlike the original: it supported several positives per query through an
item index (`idx`, columns with the same index are all targets); this function
has exactly one positive per row, the diagonal.

Input checks
------------
Shapes, dtypes, `chunk_size` and `temperature` are checked at trace time and
raise ValueError. Modality codes are checked against the known bits (1..7)
when the array is concrete (numpy, or a non-traced jax array). Checks on
values that are traced (modality codes under jit, L2 norms of the embeddings,
finiteness) run only in debug mode: `set_debug(True)` or the environment
variable `UNITE_JAX_DEBUG=1`. They use `jax.debug.callback`, so they work
under jit and shard_map, and a failure surfaces as an error when the
computation runs (its message starts with "mamcl_loss debug check failed").
The switch is read when the loss is traced: an already-compiled function keeps
the setting it was traced with.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from unite_jax.modality import IMAGE, TEXT, VIDEO
from unite_jax.modality import KNOWN_BITS as KNOWN_MODALITY_BITS

# Number of distinct codes a valid modality can take (0..7); used to count
# masked entries with a histogram instead of a [rows, columns] matrix.
_NUM_CODES = KNOWN_MODALITY_BITS + 1
# Finite stand-in for -inf: exp(-1e9 - x) is exactly 0 in float32, and unlike
# -inf it never turns a zero cotangent into NaN.
_MASKED_LOGIT = -1e9
# Tolerance on |norm - 1| in debug mode (bf16 embeddings are off by ~4e-3).
_NORM_TOLERANCE = 1e-2

_debug_override: Optional[bool] = None


def set_debug(enabled: Optional[bool]) -> None:
    """Switches the run-time value checks on (True) or off (False); None defers to UNITE_JAX_DEBUG."""
    global _debug_override
    _debug_override = enabled


def debug_enabled() -> bool:
    """Whether the run-time value checks are on (set_debug, else UNITE_JAX_DEBUG=1)."""
    if _debug_override is not None:
        return _debug_override
    return os.environ.get("UNITE_JAX_DEBUG", "0").lower() in ("1", "true", "yes")


class _Config(NamedTuple):
    temperature: float
    modality_mask: bool
    symmetric: bool
    chunk_size: Optional[int]


class _Inputs(NamedTuple):
    """Checked inputs, with the optional ones filled in.

    query, candidate: [batch, dim]; modality: [batch] int32; valid: [batch] bool;
    hard_negative: [batch, negatives, dim] or None; hard_negative_modality: [batch, negatives] int32 or None.
    """

    query: jax.Array
    candidate: jax.Array
    modality: jax.Array
    valid: jax.Array
    hard_negative: Optional[jax.Array]
    hard_negative_modality: Optional[jax.Array]


class _Columns(NamedTuple):
    """The columns of the logit matrix: embeddings [columns, dim], modality [columns], valid [columns]."""

    embeddings: jax.Array
    modality: jax.Array
    valid: jax.Array


# ----------------------------------------------------------------------------
# Input checks


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_known_codes(name: str, codes, valid, allow_absent: bool = False) -> None:
    """Raises when a concrete modality array holds a code outside 1..7 in a valid row.

    codes: [batch] or [batch, negatives]; valid: [batch] bool or None. Rows known
    to be padding (concrete valid == False) may hold anything; allow_absent also
    accepts 0 (a hard negative an example does not have).
    """
    if not _is_concrete(codes):
        return
    values = np.asarray(codes)
    bad = (values < (0 if allow_absent else 1)) | (values > KNOWN_MODALITY_BITS)
    if valid is not None and _is_concrete(valid):
        keep = np.asarray(valid).astype(bool)
        bad = bad & keep.reshape(keep.shape + (1,) * (values.ndim - 1))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name}[{', '.join(map(str, where))}] = {values[where]} is not a known modality code: expected a "
            f"bitmask of text={TEXT}, image={IMAGE}, video={VIDEO} in 1..{KNOWN_MODALITY_BITS}")


def _check_float(name: str, x, shape: tuple) -> None:
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} has dtype {x.dtype}, expected a floating dtype")


def _check_codes(name: str, x, shape: tuple) -> None:
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {shape}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} has dtype {x.dtype}, expected an integer bitmask")


def _check_config(temperature, modality_mask, symmetric, chunk_size) -> _Config:
    if isinstance(temperature, jax.core.Tracer) or np.ndim(temperature) != 0:
        raise ValueError(f"temperature must be a Python number (it is fixed, not learned), got {temperature!r}")
    temperature = float(temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
        chunk_size = int(chunk_size)
    return _Config(temperature, bool(modality_mask), bool(symmetric), chunk_size)


def _as_array(x):
    # Keeps numpy arrays numpy (so value checks stay possible) and tracers as they are.
    return x if hasattr(x, "shape") and hasattr(x, "dtype") else np.asarray(x)


def _prepare_inputs(query, candidate, candidate_modality, hard_negative, hard_negative_modality, valid) -> _Inputs:
    """Checks shapes and dtypes, fills in `valid`, gives hard negatives a negatives axis."""
    query, candidate, candidate_modality = _as_array(query), _as_array(candidate), _as_array(candidate_modality)
    valid = None if valid is None else _as_array(valid)
    if query.ndim != 2:
        raise ValueError(f"query has shape {tuple(query.shape)}, expected [batch, dim]")
    batch, dim = query.shape
    if batch < 1 or dim < 1:
        raise ValueError(f"query has shape {tuple(query.shape)}, expected batch >= 1 and dim >= 1")
    _check_float("query", query, (batch, dim))
    _check_float("candidate", candidate, (batch, dim))
    _check_codes("candidate_modality", candidate_modality, (batch,))
    if valid is not None:
        if tuple(valid.shape) != (batch,):
            raise ValueError(f"valid has shape {tuple(valid.shape)}, expected ({batch},)")
        if not (valid.dtype == bool or jnp.issubdtype(valid.dtype, jnp.integer)):
            raise ValueError(f"valid has dtype {valid.dtype}, expected bool")
    _check_known_codes("candidate_modality", candidate_modality, valid)

    if (hard_negative is None) != (hard_negative_modality is None):
        raise ValueError("hard_negative and hard_negative_modality must be given together")
    if hard_negative is not None:
        hard_negative, hard_negative_modality = _as_array(hard_negative), _as_array(hard_negative_modality)
        if hard_negative.ndim == 2:
            _check_float("hard_negative", hard_negative, (batch, dim))
            _check_codes("hard_negative_modality", hard_negative_modality, (batch,))
        elif hard_negative.ndim == 3:
            negatives = hard_negative.shape[1]
            if negatives < 1:
                raise ValueError(f"hard_negative has shape {tuple(hard_negative.shape)}, expected K >= 1")
            _check_float("hard_negative", hard_negative, (batch, negatives, dim))
            _check_codes("hard_negative_modality", hard_negative_modality, (batch, negatives))
        else:
            raise ValueError(f"hard_negative has shape {tuple(hard_negative.shape)}, expected "
                             f"[batch, dim] = ({batch}, {dim}) or [batch, K, dim] = ({batch}, K, {dim})")
        _check_known_codes("hard_negative_modality", hard_negative_modality, valid, allow_absent=True)
        # One layout inside: [batch, K, dim] and [batch, K].
        hard_negative = jnp.asarray(hard_negative).reshape(batch, -1, dim)
        hard_negative_modality = jnp.asarray(hard_negative_modality, jnp.int32).reshape(batch, -1)

    valid = jnp.ones((batch,), bool) if valid is None else jnp.asarray(valid) != 0
    return _Inputs(jnp.asarray(query), jnp.asarray(candidate), jnp.asarray(candidate_modality, jnp.int32), valid,
                   hard_negative, hard_negative_modality)


def _debug_check_values(query, candidate, modality, valid, hard_negative, hard_negative_modality) -> None:
    """Host-side value checks (debug mode); arrays are numpy. Raises ValueError on the first problem."""
    keep = np.asarray(valid).astype(bool)
    problems = []
    codes = [("candidate_modality", np.asarray(modality)[:, None])]
    vectors = [("query", np.asarray(query, np.float64)[:, None]),
               ("candidate", np.asarray(candidate, np.float64)[:, None])]
    if hard_negative is not None:
        codes.append(("hard_negative_modality", np.asarray(hard_negative_modality)))
        vectors.append(("hard_negative", np.asarray(hard_negative, np.float64)))
    for name, values in codes:
        lowest = 0 if name == "hard_negative_modality" else 1  # 0 = this example has no hard negative
        bad = ((values < lowest) | (values > KNOWN_MODALITY_BITS)) & keep[:, None]
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            problems.append(f"{name} row {row} holds {values[row].tolist()}, "
                            f"expected codes in 1..{KNOWN_MODALITY_BITS}")
    for name, values in vectors:
        if not np.isfinite(values[keep]).all():
            problems.append(f"{name} has non-finite values in valid rows")
            continue
        norms = np.linalg.norm(values, axis=-1)
        bad = (np.abs(norms - 1.0) > _NORM_TOLERANCE) & keep[:, None]
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            problems.append(f"{name} row {row} is not L2-normalised (norm {norms[row].tolist()})")
    if problems:
        raise ValueError("mamcl_loss debug check failed: " + "; ".join(problems))


def _maybe_debug_check(inputs: _Inputs) -> None:
    if debug_enabled():
        jax.debug.callback(_debug_check_values, inputs.query, inputs.candidate, inputs.modality, inputs.valid,
                           inputs.hard_negative, inputs.hard_negative_modality)


# ----------------------------------------------------------------------------
# Logits and the per-row logsumexp


def _compute_dtype(*arrays) -> jnp.dtype:
    # float32 at least: bf16 logits at temperature 0.03 lose ~0.1 nats.
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _logits(rows, cols, temperature: float):
    """rows [b, dim] . cols [n, dim] / temperature -> [b, n] in float32 (or wider)."""
    dtype = _compute_dtype(rows, cols)
    # HIGHEST: the default TPU f32 matmul rounds through bf16, which at 1/0.03 scale is a visible loss error.
    return jax.lax.dot_general(rows.astype(dtype), cols.astype(dtype), (((1,), (1,)), ((), ())),
                               precision=jax.lax.Precision.HIGHEST, preferred_element_type=dtype) / temperature


def _allowed(targets, row_modality, col_index, col_modality, col_valid, use_mask: bool):
    """[b, n] bool: column j may enter row i's softmax.

    targets [b] (global column of each row's positive), row_modality [b], col_index / col_modality / col_valid [n].
    """
    allowed = jnp.broadcast_to(col_valid[None, :], (targets.shape[0], col_index.shape[0]))
    if use_mask:
        allowed = allowed & (row_modality[:, None] == col_modality[None, :])
    return allowed | (targets[:, None] == col_index[None, :])


def _dense_cross_entropy(rows, columns: _Columns, targets, row_modality, temperature: float, use_mask: bool):
    """Per-row cross-entropy [b], positive logit [b] and hardest allowed negative logit [b] (-1e9 if none).

    The positive logit is read from the same matrix as the logsumexp, so a row whose only
    allowed column is its positive has a loss (and gradient) of exactly 0.
    """
    logits = _logits(rows, columns.embeddings, temperature)
    col_index = jnp.arange(columns.embeddings.shape[0])
    allowed = _allowed(targets, row_modality, col_index, columns.modality, columns.valid, use_mask)
    lse = jax.nn.logsumexp(jnp.where(allowed, logits, _MASKED_LOGIT), axis=-1)
    is_target = targets[:, None] == col_index[None, :]
    positive = jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
    hardest = jnp.max(jnp.where(allowed & ~is_target, logits, _MASKED_LOGIT), axis=-1)
    return lse - positive, jax.lax.stop_gradient(positive), jax.lax.stop_gradient(hardest)


def _column_blocks(cols, col_modality, col_valid, chunk_size: int):
    """Pads the columns to whole blocks: ([blocks, N, dim], index, modality, valid each [blocks, N])."""
    num_cols, dim = cols.shape
    block = min(chunk_size, num_cols)
    num_blocks = -(-num_cols // block)
    pad = num_blocks * block - num_cols
    index = jnp.arange(num_blocks * block, dtype=jnp.int32)
    cols = jnp.pad(cols, ((0, pad), (0, 0)))
    col_modality = jnp.pad(col_modality, (0, pad))
    col_valid = jnp.pad(col_valid, (0, pad))  # padding columns are invalid
    return (cols.reshape(num_blocks, block, dim), index.reshape(num_blocks, block),
            col_modality.reshape(num_blocks, block), col_valid.reshape(num_blocks, block))


def _first_and_rest(blocks):
    # The first block seeds the scan carry, so the carry is built from the inputs and has their
    # device-variance type inside shard_map (a constant initial carry would not).
    return jax.tree.map(lambda x: x[0], blocks), jax.tree.map(lambda x: x[1:], blocks)


def _block_logits(spec, rows, targets, row_modality, block):
    """One block's logits [b, N], allowed mask [b, N] and target indicator [b, N]."""
    temperature, use_mask, _ = spec
    block_cols, block_index, block_modality, block_valid = block
    logits = _logits(rows, block_cols, temperature)
    allowed = _allowed(targets, row_modality, block_index, block_modality, block_valid, use_mask)
    return logits, allowed, targets[:, None] == block_index[None, :]


def _block_statistics(spec, rows, targets, row_modality, block):
    """One block's (max, sum of exp(logit - max), positive logit or 0, hardest negative logit), each [b]."""
    logits, allowed, is_target = _block_logits(spec, rows, targets, row_modality, block)
    # Same arithmetic as a dense logsumexp over the -1e9-filled row.
    masked = jnp.where(allowed, logits, _MASKED_LOGIT)
    block_max = jnp.max(masked, axis=-1)
    block_sum = jnp.sum(jnp.exp(masked - block_max[:, None]), axis=-1)
    positive = jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
    hardest = jnp.max(jnp.where(allowed & ~is_target, logits, _MASKED_LOGIT), axis=-1)
    return block_max, block_sum, positive, hardest


def _merge_statistics(left, right):
    """Streaming logsumexp: combines two (max, sum, positive, hardest) tuples."""
    new_max = jnp.maximum(left[0], right[0])
    new_sum = left[1] * jnp.exp(left[0] - new_max) + right[1] * jnp.exp(right[0] - new_max)
    return new_max, new_sum, left[2] + right[2], jnp.maximum(left[3], right[3])


def _streaming_forward(spec, rows, cols, targets, row_modality, col_modality, col_valid):
    first, rest = _first_and_rest(_column_blocks(cols, col_modality, col_valid, spec[2]))

    def step(carry, block):
        return _merge_statistics(carry, _block_statistics(spec, rows, targets, row_modality, block)), None

    carry = _block_statistics(spec, rows, targets, row_modality, first)
    (running_max, running_sum, positive, hardest), _ = jax.lax.scan(step, carry, rest)
    lse = running_max + jnp.log(running_sum)
    return lse - positive, positive, hardest, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _streaming_cross_entropy(spec, rows, cols, targets, row_modality, col_modality, col_valid):
    """Blockwise twin of `_dense_cross_entropy`: ([b] loss, [b] positive logit, [b] hardest negative logit).

    spec = (temperature, use_mask, chunk_size); rows [b, dim]; cols [n, dim];
    targets / row_modality [b] int32; col_modality [n] int32; col_valid [n] bool.
    Only the loss is differentiable; the other two are metrics.
    """
    return _streaming_forward(spec, rows, cols, targets, row_modality, col_modality, col_valid)[:3]


def _streaming_cross_entropy_fwd(spec, rows, cols, targets, row_modality, col_modality, col_valid):
    loss, positive, hardest, lse = _streaming_forward(spec, rows, cols, targets, row_modality, col_modality,
                                                      col_valid)
    # Only [b] vectors are new memory; the inputs are alive anyway.
    return (loss, positive, hardest), (rows, cols, targets, row_modality, col_modality, col_valid, lse, positive)


def _streaming_cross_entropy_bwd(spec, residuals, cotangents):
    temperature, _, chunk_size = spec
    rows, cols, targets, row_modality, col_modality, col_valid, lse, positive = residuals
    loss_cotangent = cotangents[0]  # the positive and hardest outputs are metrics: no gradient
    dtype = _compute_dtype(rows, cols)
    rows_wide = rows.astype(dtype)

    def block_gradients(block):
        """([b, dim] row gradient, [N, dim] column gradient), both times temperature."""
        logits, allowed, is_target = _block_logits(spec, rows, targets, row_modality, block)
        # The recomputed logits may differ from the forward's in the last bit; reusing the forward's
        # positive keeps softmax - 1 exactly 0 for a row whose positive is its only allowed column.
        logits = jnp.where(is_target, positive[:, None], logits)
        # d loss_i / d logit_ij = softmax_ij - [j is i's positive]; disallowed columns get exactly 0.
        softmax = jnp.exp(jnp.where(allowed, logits - lse[:, None], -jnp.inf))
        weights = (softmax - is_target.astype(dtype)) * loss_cotangent[:, None]
        rows_grad = jnp.dot(weights, block[0].astype(dtype), precision=jax.lax.Precision.HIGHEST)
        cols_grad = jnp.dot(weights.T, rows_wide, precision=jax.lax.Precision.HIGHEST)
        return rows_grad, cols_grad

    def step(rows_grad, block):
        block_rows_grad, cols_grad = block_gradients(block)
        return rows_grad + block_rows_grad, cols_grad

    first, rest = _first_and_rest(_column_blocks(cols, col_modality, col_valid, chunk_size))
    rows_grad, first_cols_grad = block_gradients(first)
    rows_grad, rest_cols_grad = jax.lax.scan(step, rows_grad, rest)
    cols_grad = jnp.concatenate([first_cols_grad, rest_cols_grad.reshape(-1, cols.shape[1])])[: cols.shape[0]]
    return ((rows_grad / temperature).astype(rows.dtype), (cols_grad / temperature).astype(cols.dtype),
            None, None, None, None)


_streaming_cross_entropy.defvjp(_streaming_cross_entropy_fwd, _streaming_cross_entropy_bwd)


def _row_terms(rows, targets, row_modality, columns: _Columns, config: _Config, use_mask: bool):
    """Cross-entropy of each row [b, dim] against its positive, column targets[i] of `columns`.

    Returns (loss [b], positive logit [b], hardest allowed negative logit [b], -1e9 when none);
    only the loss carries gradient.
    """
    if config.chunk_size is None:
        return _dense_cross_entropy(rows, columns, targets, row_modality, config.temperature, use_mask)
    spec = (config.temperature, use_mask, config.chunk_size)
    return _streaming_cross_entropy(spec, rows, columns.embeddings, targets, row_modality, columns.modality,
                                    columns.valid)


# ----------------------------------------------------------------------------
# Per-row sums shared by the dense and sharded forms


def _candidate_columns(candidate, modality, valid, hard_negative, hard_negative_modality) -> _Columns:
    """Positives then every hard negative (row-major): [batch + batch * K] columns."""
    if hard_negative is None:
        return _Columns(candidate, modality, valid)
    negatives = hard_negative.shape[1]
    dtype = jnp.result_type(candidate, hard_negative)
    return _Columns(
        jnp.concatenate([candidate.astype(dtype), hard_negative.reshape(-1, hard_negative.shape[-1]).astype(dtype)]),
        jnp.concatenate([modality, hard_negative_modality.reshape(-1)]),
        # a negative with code 0 is absent (its example had none): it is not a column for any row
        jnp.concatenate([valid, jnp.repeat(valid, negatives) & (hard_negative_modality.reshape(-1) != 0)]))


def _masked_counts(row_modality, columns: _Columns, use_mask: bool):
    """([b] masked entries, scalar valid columns) for each row, from a histogram of column codes."""
    valid_columns = jnp.sum(columns.valid.astype(jnp.float32))
    if not use_mask:
        return jnp.zeros(row_modality.shape, jnp.float32), valid_columns
    codes = jnp.arange(_NUM_CODES)
    histogram = jnp.sum((columns.modality[:, None] == codes[None, :]) & columns.valid[:, None], axis=0)
    same = histogram[jnp.clip(row_modality, 0, _NUM_CODES - 1)].astype(jnp.float32)
    return valid_columns - same, valid_columns


def _loss_sums(local: _Inputs, columns: _Columns, query_columns: Optional[_Columns], row_offset, config: _Config):
    """Sums over this shard's rows of everything the loss and metrics need.

    local: the rows handled here ([b, ...]); columns: all q->c columns; query_columns:
    all queries as c->q columns (symmetric only); row_offset: global index of local row 0.
    """
    b = local.query.shape[0]
    targets = row_offset + jnp.arange(b, dtype=jnp.int32)
    weight = local.valid.astype(jnp.float32)
    loss, positive, hardest = _row_terms(local.query, targets, local.modality, columns, config,
                                         config.modality_mask)
    has_negative = hardest > _MASKED_LOGIT / 2
    masked, valid_columns = _masked_counts(local.modality, columns, config.modality_mask)
    metric_weight = jax.lax.stop_gradient(weight)
    sums = {
        "q2c": jnp.sum(weight * loss),
        "rows": jnp.sum(weight),
        "correct": jnp.sum(metric_weight * (~has_negative | (positive > hardest))),
        "positive": jnp.sum(metric_weight * positive) * config.temperature,
        "hardest": jnp.sum(jnp.where(has_negative, metric_weight * hardest, 0.0)) * config.temperature,
        "rows_with_negative": jnp.sum(metric_weight * has_negative),
        "masked": jnp.sum(metric_weight * masked),
        "entries": jnp.sum(metric_weight) * valid_columns,
    }
    if config.symmetric:
        c2q, _, _ = _row_terms(local.candidate, targets, local.modality, query_columns, config, False)
        sums["c2q"] = jnp.sum(weight * c2q)
    return sums


def _finalise(sums: dict, config: _Config):
    """(loss, metrics) from global sums; every metric is a float32 scalar."""
    rows = jnp.maximum(sums["rows"], 1.0)
    loss_q2c = sums["q2c"] / rows
    metrics = {
        "loss_q2c": loss_q2c,
        "accuracy": sums["correct"] / rows,
        "positive_similarity": sums["positive"] / rows,
        "hardest_negative_similarity": sums["hardest"] / jnp.maximum(sums["rows_with_negative"], 1.0),
        "masked_fraction": sums["masked"] / jnp.maximum(sums["entries"], 1.0),
        "valid_rows": sums["rows"],
    }
    loss = loss_q2c
    if config.symmetric:
        metrics["loss_c2q"] = sums["c2q"] / rows
        loss = (loss_q2c + metrics["loss_c2q"]) / 2
    metrics["loss"] = loss
    metrics = {k: jax.lax.stop_gradient(v).astype(jnp.float32) for k, v in metrics.items()}
    return loss, metrics


# ----------------------------------------------------------------------------
# Public API


def mamcl_loss(query, candidate, candidate_modality, *, temperature=0.03, modality_mask=True, symmetric=False,
               hard_negative=None, hard_negative_modality=None, valid=None, chunk_size=None):
    """MAMCL over the whole (global) batch; jittable, and exact under jit with sharded inputs.

    Args:
      query, candidate: [batch, dim] L2-normalised embeddings; candidate[i] is query[i]'s positive.
      candidate_modality: [batch] int bitmask of each positive's modality (text 1, image 2, video 4, OR-ed).
      temperature: fixed Python float (logits = q . c / temperature).
      modality_mask: keep only columns whose modality equals the row's positive's (False: plain InfoNCE).
      symmetric: average with the unmasked candidate->query term.
      hard_negative: [batch, dim] or [batch, K, dim]; every row sees all of them as extra columns.
      hard_negative_modality: [batch] or [batch, K] codes of the hard negatives; 0 = absent (that
        example has no hard negative: its column is left out for every row).
      valid: [batch] bool; False rows are padding (neither queries nor negatives).
      chunk_size: None (dense [batch, columns] logits) or N > 0 (blockwise over N columns at a time).
    Returns:
      (loss, metrics): loss a scalar; metrics a dict of float32 scalars: loss, loss_q2c, (loss_c2q),
      accuracy (q->c top-1 among allowed columns), positive_similarity, hardest_negative_similarity
      (cosine of each row's hardest allowed negative, averaged over rows that have one; 0 when none),
      masked_fraction (modality-masked share of valid row x valid column entries), valid_rows.
    """
    config = _check_config(temperature, modality_mask, symmetric, chunk_size)
    inputs = _prepare_inputs(query, candidate, candidate_modality, hard_negative, hard_negative_modality, valid)
    _maybe_debug_check(inputs)
    columns = _candidate_columns(inputs.candidate, inputs.modality, inputs.valid, inputs.hard_negative,
                                 inputs.hard_negative_modality)
    query_columns = _Columns(inputs.query, inputs.modality, inputs.valid)
    sums = _loss_sums(inputs, columns, query_columns, 0, config)
    return _finalise(sums, config)
