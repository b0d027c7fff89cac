"""Evaluation: items files, exact top-k retrieval, recall@k / precision@1, embedding files and cache.

Nothing here imports JAX: `evaluate` takes any encode function, so the training loop can run it
with its in-memory model and the CLIs (`launch/encode.py`, `launch/eval.py`) with an `Embedder`.
"""

from unite_jax.eval.evaluate import DEFAULT_KS, RetrievalTask, evaluate, format_table, load_task, score_task
from unite_jax.eval.items import ItemsError, read_items
from unite_jax.eval.metrics import precision_at_1, recall_at_k
from unite_jax.eval.retrieval import top_k
from unite_jax.eval.store import EmbeddingCache, encode_to_file, model_fingerprint

__all__ = [
    "DEFAULT_KS", "EmbeddingCache", "ItemsError", "RetrievalTask", "encode_to_file", "evaluate", "format_table",
    "load_task", "model_fingerprint", "precision_at_1", "read_items", "recall_at_k", "score_task", "top_k",
]
