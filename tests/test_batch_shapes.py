"""`batch_shapes` (what the ahead-of-time compiler builds its abstract batch from) describes exactly
the batches the packer makes: same keys, shapes and dtypes, with and without hard negatives, with a
text-only stream, over several chunks and shards."""

import numpy as np
import pytest

from unite_jax.data.batch_shapes import batch_bytes, batch_shapes
from unite_jax.data.packing import PackableInput
from unite_jax.data.pipeline.examples import PreparedExample, pack_examples
from unite_jax.data.spec import BatchSpec

PATCH_DIM = 12


def _input(rng, image: bool) -> PackableInput:
    words = rng.integers(10, 50, size=int(rng.integers(3, 9))).astype(np.int32)
    if not image:
        return PackableInput(np.append(words, 1).astype(np.int32), [], [], [])
    grid = (1, 4, 4)  # 16 patches, 4 merged tokens
    ids = np.concatenate([words, np.full(4, 7, np.int32), [1]]).astype(np.int32)
    patches = rng.integers(0, 255, size=(16, PATCH_DIM)).astype(np.float32)
    return PackableInput(ids, [patches], [grid], [(len(words), 4)])


@pytest.mark.parametrize("negatives,candidate_patches", [(False, None), (True, None), (True, 0)])
def test_batch_shapes_match_packed_batches(negatives, candidate_patches):
    spec = BatchSpec(num_chunks=2, local_shards=2, rows_per_shard=2, seq_len=32, patches_per_row=32,
                     vision_block=16, hard_negatives=negatives, max_text_tokens=None, pad_id=1,
                     patch_dim=PATCH_DIM, patch_dtype="float32", stream_patches_per_row=(None, candidate_patches, None))
    rng = np.random.default_rng(0)
    examples = [PreparedExample(query=_input(rng, True), candidate=_input(rng, candidate_patches != 0),
                                negative=_input(rng, False) if negatives else None, target_modal=1,
                                negative_modal=1 if negatives else 0, where=f"record {i}")
                for i in range(spec.local_batch_size)]
    arrays, _ = pack_examples(examples, spec)
    described = batch_shapes(spec)
    assert set(described) == set(arrays)
    total = 0
    for key, value in described.items():
        pairs = value.items() if isinstance(value, dict) else [(None, value)]
        if isinstance(value, dict):
            assert set(value) == set(arrays[key]), key
        for name, (shape, dtype) in pairs:
            real = arrays[key][name] if name else arrays[key]
            assert real.shape == shape, (key, name, real.shape, shape)
            assert real.dtype == dtype, (key, name, real.dtype, dtype)
            total += real.nbytes
    assert batch_bytes(described) == total
