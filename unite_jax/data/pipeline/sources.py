"""Record sources and their order: the `data.train` entries opened, and the infinite, shuffled, mixed
stream of (source number, record index) that every process slices its share from."""

from __future__ import annotations

import grain

from unite_jax.data.manifest import RecordSource, open_manifest, parse_train_spec
from unite_jax.data.records import DataError
from unite_jax.data.tfds_source import TfdsSource, is_tfds_entry


def open_sources(data_cfg) -> tuple[list[RecordSource], list[float]]:
    """The record sources of data_cfg.train and their mixing weights."""
    sources, weights = [], []
    fields = dict(data_cfg.tfds_fields) if "tfds_fields" in data_cfg else {}
    for entry, weight in parse_train_spec(data_cfg.train):
        if is_tfds_entry(entry):
            sources.append(TfdsSource(entry, fields, data_dir=data_cfg.tfds_data_dir, media_root=data_cfg.media_root))
        else:
            sources.append(open_manifest(entry, data_cfg.media_root))
        weights.append(weight)
    return sources, weights


class _TagSource:
    """Record index -> (source number, record index). A class, not a lambda, so workers can unpickle it."""

    def __init__(self, source: int):
        self.source = source

    def __call__(self, index):
        return self.source, int(index)


def index_dataset(sizes: list[int], weights: list[float], *, seed: int, shuffle: bool, process_index: int,
                  process_count: int, names: list[str] | None = None) -> grain.MapDataset:
    """Infinite MapDataset of (source number, record index): this process's share of one global stream.

    Every process builds the same global stream: each source shuffled per epoch (source k with seed
    seed + k * 1_000_003; Grain reshuffles each repetition) and repeated, the sources mixed by weight.
    Process i then keeps positions i, i + N, i + 2N, ... of it (N = process_count). So the processes'
    shares are disjoint, and the union of their local batches at step t is exactly the global batch a
    single process would read at step t: a run on N hosts trains on the same examples as on one.
    """
    names = names or [f"source {k}" for k in range(len(sizes))]
    parts = []
    for k, size in enumerate(sizes):
        if size < 1:
            raise DataError(f"data.train: {names[k]} has no records")
        ds = grain.MapDataset.range(size)
        if shuffle:
            ds = ds.shuffle(seed=seed + k * 1_000_003)
        parts.append(ds.repeat().map(_TagSource(k)))
    stream = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
    return stream[process_index::process_count] if process_count > 1 else stream
