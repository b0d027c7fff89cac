"""Retrieval metrics over ranked candidate lists (see `retrieval.top_k` for how lists are ranked).

Definitions (fractions in [0, 1], averaged over queries):
- recall@k: the query has AT LEAST ONE of its positives among its top k candidates
  (with a single positive per query this is the usual R@k; with several it is the hit rate,
  not the fraction of positives found). A query whose candidate list is shorter than k counts
  its whole list.
- precision@1: the top-1 candidate is a positive (MMEB's metric; equal to recall@1 under
  these definitions, reported under its own name for MMEB-style evaluations).
- reverse_recall@k: recall@k in the candidate -> query direction, reported only when queries
  and candidates are symmetric pairs (every query has exactly one positive and every candidate
  is the positive of exactly one query); the positive of a candidate is the query that lists it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def hit_matrix(ranked: np.ndarray, positives: Sequence[Sequence[int]]) -> np.ndarray:
    """bool [Q, K]: is ranked[i, j] one of query i's positives.

    ranked: int [Q, K] candidate indices, best first, -1 for empty slots.
    positives: per query, the candidate indices that count as correct.
    """
    ranked = np.asarray(ranked)
    if ranked.ndim != 2 or len(ranked) != len(positives):
        raise ValueError(f"ranked has shape {ranked.shape} but there are {len(positives)} queries")
    width = int(max(ranked.max(initial=-1), max((max(p) for p in positives if len(p)), default=-1))) + 1
    # (query, candidate) pairs as one integer each, so membership is one vectorised lookup
    positive_codes = np.concatenate([np.asarray(p, np.int64) + i * width for i, p in enumerate(positives)]
                                    + [np.zeros(0, np.int64)])
    codes = ranked.astype(np.int64) + np.arange(len(ranked), dtype=np.int64)[:, None] * width
    return np.isin(codes, positive_codes) & (ranked >= 0)


def recall_at_k(ranked: np.ndarray, positives: Sequence[Sequence[int]], ks: Sequence[int] = (1, 5, 10),
                prefix: str = "") -> dict[str, float]:
    """{f"{prefix}recall@{k}": fraction of queries with a positive in their top k} for each k.

    ranked must hold at least max(ks) columns (as `top_k(..., k=max(ks))` returns).
    """
    hits = hit_matrix(ranked, positives)
    if max(ks) > hits.shape[1]:
        raise ValueError(f"ranked lists have {hits.shape[1]} columns, fewer than k = {max(ks)}")
    return {f"{prefix}recall@{k}": float(hits[:, :k].any(axis=1).mean()) for k in ks}


def precision_at_1(ranked: np.ndarray, positives: Sequence[Sequence[int]]) -> float:
    """Fraction of queries whose top-1 candidate is a positive."""
    return float(hit_matrix(ranked, positives)[:, 0].mean())


def one_to_one_pairs(positives: Sequence[Sequence[int]], num_candidates: int) -> bool:
    """True when every query has exactly one positive and every candidate is exactly one query's positive."""
    if any(len(p) != 1 for p in positives) or len(positives) != num_candidates:
        return False
    return len({int(p[0]) for p in positives}) == num_candidates


def reverse_positives(positives: Sequence[Sequence[int]], num_candidates: int) -> list[list[int]]:
    """Per candidate, the queries that list it as a positive (the candidate -> query ground truth)."""
    reverse: list[list[int]] = [[] for _ in range(num_candidates)]
    for query, candidates in enumerate(positives):
        for candidate in candidates:
            reverse[int(candidate)].append(query)
    return reverse
