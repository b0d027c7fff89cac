"""The shapes and dtypes of one training batch, without building one.

`batch_shapes(spec)` is the single description of the batch layout that code
which never sees data relies on: the ahead-of-time compiler builds its abstract
batch from it (unite_jax/train/aot.py), and a test checks that the packer's
real batches (`pipeline.examples.pack_examples`) have exactly these shapes. A change of
layout (token-budget packing, more streams) changes this function and the
packer together, and the test keeps them in step.

numpy only: the data layer never imports JAX.
"""

from __future__ import annotations

import numpy as np

from unite_jax.data.spec import STREAMS


def batch_shapes(spec) -> dict:
    """{stream: {key: (shape, dtype)}, "candidate_modality": (shape, dtype), ...} of a process-local batch.

    spec: a `spec.BatchSpec` (C chunks, S local shards, b rows per shard, L = seq_len,
    P = the stream's patch budget per shard, D = patch_dim). For the global batch of a mesh, give a
    spec whose local_shards is the mesh's number of batch shards.
    """
    c, s, b, length = spec.num_chunks, spec.local_shards, spec.rows_per_shard, spec.seq_len
    rows = s * b
    out: dict = {}
    for stream in STREAMS[:3 if spec.hard_negatives else 2]:
        patches = spec.stream_patch_budget(stream)
        out[stream] = {
            "input_ids": ((c, rows, length), np.dtype(np.int32)),
            "attention_mask": ((c, rows, length), np.dtype(np.int32)),
            "position_ids": ((c, rows, 3, length), np.dtype(np.int32)),
            "patches": ((c, s, patches, spec.patch_dim), np.dtype(spec.patch_dtype)),
            "patch_segment_ids": ((c, s, patches), np.dtype(np.int32)),
            "patch_positions": ((c, s, patches, 2), np.dtype(np.int32)),
            "merged_dest": ((c, s, patches // spec.merge_size**2), np.dtype(np.int32)),
        }
    out["candidate_modality"] = ((c, rows), np.dtype(np.int32))
    if spec.hard_negatives:
        out["negative_modality"] = ((c, rows), np.dtype(np.int32))
    out["valid"] = ((c, rows), np.dtype(np.bool_))
    return out


def batch_bytes(shapes: dict) -> int:
    """Total bytes of a `batch_shapes` description."""
    total = 0
    for value in shapes.values():
        entries = value.values() if isinstance(value, dict) else [value]
        total += sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in entries)
    return total
