"""The training input pipeline: manifests -> static-shape, modality-tagged contrastive batches.

    data_cfg = default_data_config(); data_cfg.train = "pairs.jsonl@2,more.json"
    spec = BatchSpec.from_config(data_cfg, num_chunks=1, local_shards=8, rows_per_shard=4,
                                 pad_id=tokenizer.pad_id, patch_dim=processor.patch_dim)
    it = build_train_iterator(data_cfg, spec, tokenizer, processor, seed=0, process_index=0, process_count=1)
    for device_batch, host_batch, state in prefetch_to_device(it, put_fn):
        ...  # checkpoint `state` with the step that consumed `device_batch`

Order of work (Grain):
  1. every `data.train` entry is a random-access record source (manifest.py, tfds_source.py);
  2. per source, a `MapDataset` of record indices: this process's slice (`process_index::process_count`),
     shuffled with seed + epoch (Grain's per-epoch reshuffle), repeated forever; several sources
     are mixed by weight (`MapDataset.mix`). Elements are (source number, record index): cheap to
     shuffle, shard and checkpoint;
  3. a batching step reads each record, runs it through `unite_jax.data.items.prepare_item` (the
     Embedder's own prompt / tokenisation / media code path) for the query, the candidate and the
     hard negative, skips bad records (keeping where and why), and packs exactly one local batch;
  4. optionally `mp_prefetch` runs steps 2-3 in worker processes, each on a slice of the stream;
  5. the main process counts and logs skipped records and enforces `data.strict` /
     `data.max_bad_fraction`.

Batch layout (`HostBatch.arrays`), C chunks, S local shards, b rows per shard, L = seq_len,
P = b * patches_per_row (per stream: b * data.<stream>_patches_per_row when set; 0 for a text-only stream):
  arrays["query"], arrays["candidate"] (and arrays["negative"] with data.hard_negatives): the
  packer's BATCH_KEYS (unite_jax.data.packing) with a leading chunk axis:
    input_ids [C, S*b, L] int32, attention_mask [C, S*b, L] int32, position_ids [C, S*b, 3, L] int32,
    patches [C, S, P, patch_dim] uint8 pixel levels (data.patch_dtype="uint8", the default: the train
      step normalises them with `unite_jax.model.pixels.normalize_levels`) or float32 normalised,
    patch_segment_ids [C, S, P] int32,
    patch_positions [C, S, P, 2] int32, merged_dest [C, S, P/4] int32
  arrays["candidate_modality"] [C, S*b] int32 (text=1, image=2, video=4, OR-ed),
  arrays["negative_modality"] [C, S*b] int32 (with hard negatives; 0 = the example has none),
  arrays["valid"] [C, S*b] bool (all True).
Chunk c, shard s, row r holds example number (c*S + s)*b + r of the local batch (C*S*b examples).
Each row's vision slices sit in tiles of that row alone (`pack_batch(share_tiles=False)`), so an
example that fits one row (<= seq_len tokens per stream, <= patches_per_row patches in whole
tiles) always fits its shard: every batch has the same shapes, one compilation.

Worker processes are started with the 'spawn' method: the program that builds the iterator with
data.num_workers > 0 must guard its entry point with `if __name__ == "__main__":`.

Files: examples.py (prepare, check, pack), sources.py (record sources, the index stream), workers.py
(batching in worker processes), iterator.py (accounting, checkpointing, `build_train_iterator`),
prefetch.py (device prefetch); the `data.*` keys and `BatchSpec` are in `unite_jax.data.spec` (no
grain import there, so configs stay light). This package's namespace is the public API.
"""

from unite_jax.data.pipeline.examples import ExampleBuilder, PreparedExample, fit_problem, pack_examples
from unite_jax.data.pipeline.iterator import HostBatch, TrainBatchIterator, build_train_iterator
from unite_jax.data.pipeline.prefetch import DevicePrefetcher, prefetch_to_device
from unite_jax.data.pipeline.sources import index_dataset, open_sources
from unite_jax.data.records import BAD_INPUT_KINDS, DROP_KINDS, DataError
from unite_jax.data.spec import BatchSpec, default_data_config, make_processor, processor_overrides

__all__ = ["BAD_INPUT_KINDS", "DROP_KINDS", "BatchSpec", "DataError", "DevicePrefetcher", "ExampleBuilder",
           "HostBatch", "PreparedExample", "TrainBatchIterator", "build_train_iterator", "default_data_config",
           "fit_problem", "index_dataset", "make_processor", "open_sources", "pack_examples",
           "prefetch_to_device", "processor_overrides"]
