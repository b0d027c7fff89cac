"""Retrieval evaluation of any encode function on a queries file and a candidates file.

    result = evaluate(encode_fn, "queries.jsonl", "candidates.jsonl")
    # {"recall@1": 0.61, "recall@5": 0.87, "recall@10": 0.93, "num_queries": 1000, "num_candidates": 1000,
    #  "reverse_recall@1": ..., ...}

`encode_fn(items) -> float32 [len(items), D]` receives item dicts holding only `text`, `image`
(absolute path or list of paths) and/or `video`, with the query instruction already in the text;
`Embedder.encode` fits, and so does a training loop's in-memory encoder (no model directory is
needed). Scores are dot products of what encode_fn returns (cosine for UNITE's unit vectors).
Metric definitions: `unite_jax.eval.metrics`; ranking and tie rule: `unite_jax.eval.retrieval`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from unite_jax.eval import metrics, retrieval
from unite_jax.eval.items import QUERY_KEYS, ItemsError, encode_inputs, items_fingerprint, read_items_with_lines
from unite_jax.eval.store import EmbeddingCache, EncodeFn, encode_in_chunks, run_key
from unite_jax.progress import Progress, log

DEFAULT_KS = (1, 5, 10)


@dataclasses.dataclass
class RetrievalTask:
    """A validated queries/candidates pair of files.

    positives[i]: int64 candidate indices that count as correct for query i.
    subsets: None, or per query the int64 candidate indices it is ranked among (MMEB style).
    query_lines / candidate_lines: "FILE:LINE" of each item, for error messages.
    """

    queries: list[dict]
    candidates: list[dict]
    positives: list[np.ndarray]
    subsets: list[np.ndarray] | None
    query_lines: list[str]
    candidate_lines: list[str]


def load_task(queries_path: str, candidates_path: str, *, check_media: bool = True) -> RetrievalTask:
    """Reads both files and resolves `positives` / `candidates` ids to candidate indices.

    Errors name QUERIES:LINE and the field: an id that is not in the candidates file, a positive
    missing from the query's own `candidates` list, or a file where only some queries list
    `candidates` (MMEB style must be all or none).
    """
    queries, q_lines = read_items_with_lines(queries_path, extra_keys=QUERY_KEYS, check_media=check_media)
    candidates, c_lines = read_items_with_lines(candidates_path, check_media=check_media)
    query_where = [f"{queries_path}:{n}" for n in q_lines]
    candidate_index = {item["id"]: i for i, item in enumerate(candidates)}
    with_subsets = ["candidates" in q for q in queries]
    if any(with_subsets) and not all(with_subsets):
        first = query_where[with_subsets.index(not with_subsets[0])]
        raise ItemsError(f"{first}: field 'candidates': either every query lists its 'candidates' (MMEB style) "
                         f"or none does; {sum(with_subsets)} of {len(queries)} do")
    positives, subsets = [], [] if all(with_subsets) else None
    for query, where in zip(queries, query_where):
        if "positives" not in query:
            raise ItemsError(f"{where}: missing field 'positives' (a list of candidate ids)")
        positives.append(_resolve(query["positives"], "positives", where, candidate_index, candidates_path))
        if subsets is not None:
            subset = _resolve(query["candidates"], "candidates", where, candidate_index, candidates_path)
            outside = sorted(set(query["positives"]) - set(query["candidates"]))
            if outside:
                raise ItemsError(f"{where}: field 'positives': {outside} not among the query's own 'candidates'")
            subsets.append(subset)
    return RetrievalTask(queries, candidates, positives, subsets, query_where,
                         [f"{candidates_path}:{n}" for n in c_lines])


def score_task(query_vectors: np.ndarray, candidate_vectors: np.ndarray, positives: Sequence[Sequence[int]],
               subsets: Sequence[np.ndarray] | None = None, *, ks: Sequence[int] = DEFAULT_KS,
               backend: str = "auto") -> dict:
    """Metrics of vectors already encoded: query_vectors [Q, D], candidate_vectors [N, D].

    Returns recall@k for each k, precision@1 when `subsets` is given (MMEB style),
    reverse_recall@k when the pairs are one to one (and there are no subsets), and the counts
    num_queries / num_candidates.
    """
    ks = tuple(sorted({int(k) for k in ks}))
    ranked, _ = retrieval.top_k(query_vectors, candidate_vectors, max(ks), backend=backend,
                                candidate_subsets=None if subsets is None else list(subsets))
    result = metrics.recall_at_k(ranked, positives, ks)
    if subsets is not None:
        result["precision@1"] = metrics.precision_at_1(ranked, positives)
    elif metrics.one_to_one_pairs(positives, len(candidate_vectors)):
        reverse, _ = retrieval.top_k(candidate_vectors, query_vectors, max(ks), backend=backend)
        result.update(metrics.recall_at_k(reverse, metrics.reverse_positives(positives, len(candidate_vectors)),
                                          ks, prefix="reverse_"))
    result["num_queries"] = len(query_vectors)
    result["num_candidates"] = len(candidate_vectors)
    return result


def evaluate(encode_fn: EncodeFn, queries_path: str, candidates_path: str, *, batch_size: int | None = None,
             query_instruction: str | None = None, candidate_instruction: str | None = None,
             cache_dir: str | None = None, model_key: str | None = None, backend: str = "auto",
             ks: Sequence[int] = DEFAULT_KS, show_progress: bool = False) -> dict:
    """Encodes both files with encode_fn and returns `score_task`'s metrics (a JSON-ready dict).

    batch_size: items handed to encode_fn per call (None: all of one file in one call).
    query_instruction / candidate_instruction: put in front of each item's text as in training
        (`unite_jax.data.items.join_instruction`).
    cache_dir: when given, vectors are stored as CACHE_DIR/<key>.npy with key = hash(model_key,
        the items file's bytes and its media files' sizes and mtimes, the instruction); a later call
        with the same key loads them instead of encoding. model_key is then required: a string that
        changes whenever the vectors would (the CLI uses `store.model_fingerprint` of the directory
        and options such as dtype; a training loop might use its workdir and step).
    """
    if cache_dir is not None and not model_key:
        raise ValueError("evaluate: cache_dir needs a model_key (what identifies the encoder's weights and options)")
    task = load_task(queries_path, candidates_path)
    cache = EmbeddingCache(cache_dir) if cache_dir is not None else None
    encoded: dict[str, np.ndarray] = {}  # the same file with the same instruction is encoded once

    def vectors_of(path: str, items: list[dict], lines: list[str], instruction: str | None, label: str):
        key = run_key(model=model_key, items=items_fingerprint(path, items), instruction=instruction or None)
        if key in encoded:
            return encoded[key]
        cached = cache.load(key, len(items)) if cache is not None else None
        if cached is not None:
            if show_progress:
                log(f"{label}: {len(items)} vectors from cache {cache.path(key)}")
            encoded[key] = cached
            return cached
        inputs = encode_inputs(items, instruction)
        vectors = encode_in_chunks(encode_fn, inputs, batch_size, Progress(len(items), label, enabled=show_progress),
                                   lines)
        if cache is not None:
            cache.save(key, vectors)
        encoded[key] = vectors
        return vectors

    query_vectors = vectors_of(queries_path, task.queries, task.query_lines, query_instruction, "queries")
    candidate_vectors = vectors_of(candidates_path, task.candidates, task.candidate_lines, candidate_instruction,
                                   "candidates")
    if query_vectors.shape[1] != candidate_vectors.shape[1]:
        raise ValueError(f"query vectors have dimension {query_vectors.shape[1]}, candidate vectors "
                         f"{candidate_vectors.shape[1]}")
    return score_task(query_vectors, candidate_vectors, task.positives, task.subsets, ks=ks, backend=backend)


def format_table(result: dict) -> str:
    """A readable two-column table of a result dict (metrics as percentages, counts as integers)."""
    rows = [("metric", "value")]
    for name, value in result.items():
        rows.append((name, f"{100 * value:6.2f} %" if isinstance(value, float) else str(value)))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value:>9}" for name, value in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _resolve(ids: list[str], field: str, where: str, index: dict[str, int], candidates_path: str) -> np.ndarray:
    missing = [i for i in ids if i not in index]
    if missing:
        raise ItemsError(f"{where}: field {field!r}: unknown candidate id(s) {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''} (not in {candidates_path})")
    return np.asarray([index[i] for i in ids], np.int64)
