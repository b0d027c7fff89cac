"""Exact top-k retrieval by inner product, with one deterministic order shared by every backend.

Ranking rule (what `top_k` returns, whichever backend):
- candidates are ordered by their score, highest first; the score is the dot product of the
  float32 vectors evaluated by `exact_scores` (float64 products, summed in one fixed order);
- equal scores are broken by candidate index: the candidate that comes first in the
  candidates file (lower index) ranks first.

Why two stages: a float32 matrix product (numpy's BLAS, faiss) rounds differently depending on
the shapes and blocking it happens to use, so two backends (or two chunk sizes) can order
near-equal candidates differently, and faiss does not promise any order among ties. Each
backend therefore only SHORTLISTS: it keeps every candidate whose float32 score is within a
rounding-error margin of its k-th best float32 score. Every shortlisted pair is then re-scored
with `exact_scores`, a function of the two vectors alone (fixed summation order, independent
of batch shapes), and ranked by (exact score desc, index asc). The margin is twice the
worst-case float32 dot-product error bound (gamma_D * |q| * |c|, Higham) plus that of the
re-scoring, so the shortlist provably holds the true top k under the exact scores, and both
backends return the same indices in the same order.
"""

from __future__ import annotations

import numpy as np

BACKENDS = ("auto", "numpy", "faiss")
# `backend="auto"` uses faiss (when installed) from this many candidates on: below it a chunked
# numpy product is as fast and needs no extra package.
FAISS_MIN_CANDIDATES = 100_000
# float32 score block kept in memory by the numpy path: [query chunk, candidates].
SCORE_BLOCK_ELEMENTS = 1 << 24
# float64 products kept in memory at a time while re-scoring shortlisted pairs.
RESCORE_BLOCK_ELEMENTS = 1 << 22


def top_k(query_vectors: np.ndarray, candidate_vectors: np.ndarray, k: int, backend: str = "auto",
          candidate_subsets: list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k best candidates of every query by inner product, in the ranking rule of this module.

    query_vectors: [Q, D]; candidate_vectors: [N, D] (float; used as float32).
    candidate_subsets: None (rank every candidate), or one 1-D array of candidate indices per query
        (MMEB style: query i is ranked only among candidate_subsets[i]; indices unique, in [0, N)).
    backend: "numpy" (exact, chunked over queries), "faiss" (IndexFlatIP shortlist; needs
        `pip install -e ".[faiss]"`), or "auto" (faiss from FAISS_MIN_CANDIDATES candidates on when it
        is installed, else numpy). Subsets always use numpy. All backends give identical results.
    Returns (indices int64 [Q, k], scores float64 [Q, k], the `exact_scores` of those pairs); when
    fewer than k candidates are available, the remaining slots hold index -1 and score -inf.
    """
    queries = _as_matrix(query_vectors, "query_vectors")
    candidates = _as_matrix(candidate_vectors, "candidate_vectors")
    if queries.shape[1] != candidates.shape[1]:
        raise ValueError(f"query_vectors have dimension {queries.shape[1]} but candidate_vectors "
                         f"{candidates.shape[1]}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if candidate_subsets is not None:
        return _top_k_subsets(queries, candidates, int(k), _check_subsets(candidate_subsets, queries, candidates))
    if backend == "auto":
        backend = "faiss" if len(candidates) >= FAISS_MIN_CANDIDATES and _faiss_available() else "numpy"
    if backend == "faiss":
        return _top_k_faiss(queries, candidates, int(k))
    return _top_k_numpy(queries, candidates, int(k))


def exact_scores(query_vectors: np.ndarray, candidate_vectors: np.ndarray, query_rows: np.ndarray,
                 candidate_rows: np.ndarray) -> np.ndarray:
    """float64 [M] scores of the pairs (query_rows[m], candidate_rows[m]).

    Each product of two float32 numbers is exact in float64; the D products are then summed by
    halving (pad to a power of two, add the upper half onto the lower half, repeat), a fixed order
    made of element-wise additions. A pair's score therefore depends only on its two vectors, never
    on which other pairs share the call, which is what makes the ranking reproducible.
    """
    dim = query_vectors.shape[1]
    width = 1 << max(0, (dim - 1).bit_length())
    out = np.empty(len(query_rows), np.float64)
    block = max(1, RESCORE_BLOCK_ELEMENTS // width)
    for start in range(0, len(query_rows), block):
        stop = min(start + block, len(query_rows))
        products = np.zeros((stop - start, width), np.float64)
        products[:, :dim] = query_vectors[query_rows[start:stop]].astype(np.float64)
        products[:, :dim] *= candidate_vectors[candidate_rows[start:stop]].astype(np.float64)
        half = width
        while half > 1:
            half //= 2
            products = products[:, :half] + products[:, half:2 * half]
        out[start:stop] = products[:, 0]
    return out


def score_margin(query_vectors: np.ndarray, candidate_vectors: np.ndarray) -> np.ndarray:
    """float32 [Q] per-query shortlist margin: 2 x (float32 + float64 dot-product error bounds).

    |fl32(q.c) - q.c| <= gamma_D * sum_i |q_i c_i| <= gamma_D * |q| * |c| with
    gamma_D = D u / (1 - D u), u = 2^-24, for any summation order (BLAS, SIMD, FMA); the
    re-scoring's error is bounded the same way with u = 2^-53. Doubled once more for safety.
    """
    dim = query_vectors.shape[1]
    gamma32 = dim * 2.0**-24 / (1 - dim * 2.0**-24)
    gamma64 = dim * 2.0**-53 / (1 - dim * 2.0**-53)
    query_norms = np.linalg.norm(query_vectors.astype(np.float64), axis=1)
    max_candidate_norm = float(np.linalg.norm(candidate_vectors.astype(np.float64), axis=1).max(initial=0.0))
    bound = (gamma32 + gamma64) * query_norms * max_candidate_norm
    return (4.0 * bound + 1e-30).astype(np.float64)


# ----------------------------------------------------------------------------- backends
def _top_k_numpy(queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunked over queries so at most SCORE_BLOCK_ELEMENTS float32 scores exist at a time."""
    num_queries, num_candidates = len(queries), len(candidates)
    indices, scores = _empty_result(num_queries, k)
    margin = score_margin(queries, candidates)
    keep = min(k, num_candidates)
    chunk = max(1, SCORE_BLOCK_ELEMENTS // max(num_candidates, 1))
    for start in range(0, num_queries, chunk):
        stop = min(start + chunk, num_queries)
        block = _shortlist_scores(queries[start:stop], candidates)
        kth_best = -np.partition(-block, keep - 1, axis=1)[:, keep - 1]
        rows, cols = np.nonzero(block >= (kth_best - margin[start:stop])[:, None])
        _rank_pairs(queries, candidates, rows + start, cols, k, indices, scores)
    return indices, scores


def _top_k_faiss(queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss IndexFlatIP finds the shortlist; rows whose shortlist may be cut short are searched wider."""
    faiss = _import_faiss()
    num_queries, num_candidates = len(queries), len(candidates)
    indices, scores = _empty_result(num_queries, k)
    index = faiss.IndexFlatIP(candidates.shape[1])
    index.add(candidates)
    margin = score_margin(queries, candidates)
    keep = min(k, num_candidates)
    pending = np.arange(num_queries)
    width = min(num_candidates, max(2 * keep, keep + 32))
    while len(pending):
        found_scores, found = index.search(queries[pending], width)
        threshold = found_scores[:, keep - 1] - margin[pending]
        # complete when the widest result is already below the threshold (all others are lower still)
        complete = (found_scores[:, -1] < threshold) | (width == num_candidates)
        rows, cols = np.nonzero((found_scores >= threshold[:, None]) & (found >= 0) & complete[:, None])
        _rank_pairs(queries, candidates, pending[rows], found[rows, cols], k, indices, scores)
        pending = pending[~complete]
        width = min(num_candidates, width * 4)
    return indices, scores


def _top_k_subsets(queries: np.ndarray, candidates: np.ndarray, k: int,
                   subsets: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Each query among its own candidates; the shortlists of many queries are re-scored together."""
    indices, scores = _empty_result(len(queries), k)
    margin = score_margin(queries, candidates)
    pair_rows, pair_cols, pending = [], [], 0
    for i, subset in enumerate(subsets):
        block = _shortlist_scores(queries[i:i + 1], candidates[subset])[0]
        keep = min(k, len(subset))
        kth_best = -np.partition(-block, keep - 1)[keep - 1]
        chosen = subset[block >= kth_best - margin[i]]
        pair_rows.append(np.full(len(chosen), i, np.int64))
        pair_cols.append(chosen)
        pending += len(chosen)
        if pending >= SCORE_BLOCK_ELEMENTS // 64 or i == len(subsets) - 1:
            _rank_pairs(queries, candidates, np.concatenate(pair_rows), np.concatenate(pair_cols), k, indices,
                        scores)
            pair_rows, pair_cols, pending = [], [], 0
    return indices, scores


def _shortlist_scores(queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """float32 [m, N] approximate scores (BLAS); any error within `score_margin` is tolerated."""
    return queries @ candidates.T


def _rank_pairs(queries: np.ndarray, candidates: np.ndarray, rows: np.ndarray, cols: np.ndarray, k: int,
                indices: np.ndarray, scores: np.ndarray) -> None:
    """Writes the first k shortlisted candidates of each row, by (exact score desc, index asc)."""
    if not len(rows):
        return
    rows, cols = rows.astype(np.int64), cols.astype(np.int64)
    exact = exact_scores(queries, candidates, rows, cols)
    order = np.lexsort((cols, -exact, rows))  # last key is the primary one
    rows, cols, exact = rows[order], cols[order], exact[order]
    first_of_row = np.searchsorted(rows, rows, side="left")
    rank = np.arange(len(rows)) - first_of_row
    take = rank < k
    indices[rows[take], rank[take]] = cols[take]
    scores[rows[take], rank[take]] = exact[take]


# ----------------------------------------------------------------------------- checks and helpers
def _as_matrix(vectors, name: str) -> np.ndarray:
    array = np.asarray(vectors)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name}: expected a float array [num, dim], got {array.dtype} {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name}: empty array of shape {array.shape}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        raise ValueError(f"{name}: row {int(np.flatnonzero(~finite)[0])} holds NaN or infinite values")
    return array


def _check_subsets(subsets, queries: np.ndarray, candidates: np.ndarray) -> list[np.ndarray]:
    if len(subsets) != len(queries):
        raise ValueError(f"candidate_subsets: {len(subsets)} subsets for {len(queries)} queries")
    checked = []
    for i, subset in enumerate(subsets):
        subset = np.asarray(subset)
        if subset.ndim != 1 or not len(subset) or not np.issubdtype(subset.dtype, np.integer):
            raise ValueError(f"candidate_subsets[{i}]: expected a non-empty 1-D integer array, got "
                             f"{subset.dtype} {subset.shape}")
        if subset.min() < 0 or subset.max() >= len(candidates):
            raise ValueError(f"candidate_subsets[{i}]: indices must lie in [0, {len(candidates)})")
        ordered = np.sort(subset).astype(np.int64)
        if (np.diff(ordered) == 0).any():
            raise ValueError(f"candidate_subsets[{i}]: repeated candidate index")
        checked.append(ordered)
    return checked


def _empty_result(num_queries: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((num_queries, k), -1, np.int64), np.full((num_queries, k), -np.inf, np.float64)


def _faiss_available() -> bool:
    try:
        _import_faiss()
    except ImportError:
        return False
    return True


def _import_faiss():
    try:
        import faiss
    except ImportError as e:
        raise ImportError("backend 'faiss' needs the faiss-cpu package: pip install -e \".[faiss]\" "
                          "(or use backend 'numpy', which gives the same results)") from e
    return faiss
