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
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import grain
import numpy as np

from unite_jax.data import media
from unite_jax.data.items import prepare_item
from unite_jax.data.manifest import (
    BAD_INPUT_KINDS,
    DROP_KINDS,
    BadRecord,
    DataError,
    Example,
    RecordError,
    RecordSource,
    open_manifest,
    parse_train_spec,
)
from unite_jax.data.packing import BATCH_KEYS, PackableInput, first_fit, pack_batch
from unite_jax.data.tfds_source import TfdsSource, is_tfds_entry
from unite_jax.data.spec import (
    BatchSpec,
    default_data_config,
    make_processor,
    processor_overrides,
)
from unite_jax.data.tokenize import PromptTokenizer

log = logging.getLogger(__name__)

STATE_VERSION = 1
# A worker that meets this many skipped records without completing a batch reports them anyway, so
# the main process can count them (and stop on data.max_bad_fraction) even when nothing is usable.
REPORT_EVERY = 64
MAX_LOGGED_IN_STATE = 10_000


# --------------------------------------------------------------------------- examples


@dataclasses.dataclass
class PreparedExample:
    """One example ready to pack: each stream tokenised, its media pre-processed."""

    query: PackableInput
    candidate: PackableInput
    negative: PackableInput | None  # None: no negative (hard negatives off, or masked)
    target_modal: int
    negative_modal: int
    where: str


class ExampleBuilder:
    """Record -> PreparedExample through `prepare_item` (as the Embedder does), checked against the static shapes."""

    def __init__(self, tokenizer: PromptTokenizer, processor: media.ProcessorConfig, spec: BatchSpec,
                 missing_negative: str = "mask"):
        if missing_negative not in ("mask", "drop"):
            raise ValueError(f"data.missing_negative: expected 'mask' or 'drop', got {missing_negative!r}")
        self.tokenizer = tokenizer
        self.processor = processor
        self.spec = spec
        self.missing_negative = missing_negative

    def build(self, source: RecordSource, index: int) -> PreparedExample | BadRecord | None:
        """Record `index` of `source` prepared, or the reason it is skipped; None for a blank line."""
        try:
            example = source.example(index)
            if example is None:
                return None
            return self.prepare(example)
        except RecordError as e:
            return BadRecord(source.where(index), e.kind, e.message)
        except media.MediaError as e:  # undecodable image bytes inside a TFDS record
            return BadRecord(source.where(index), "unreadable media", str(e))

    def prepare(self, example: Example) -> PreparedExample:
        spec = self.spec
        query = self._stream(example.query, "query")
        candidate = self._stream(example.candidate, "candidate")
        negative = None
        if spec.hard_negatives:
            if example.negative_error is not None:
                raise example.negative_error
            if example.negative is not None:
                negative = self._stream(example.negative, "negative")
            elif self.missing_negative == "drop":
                raise RecordError("no negative", "data.hard_negatives is on and data.missing_negative='drop', "
                                                 "but the record has no negative")
        return PreparedExample(query, candidate, negative, example.target_modal,
                               example.negative_modal if negative is not None else 0, example.where)

    def _stream(self, item: dict, role: str) -> PackableInput:
        try:
            packable = prepare_item(item, 0, self.tokenizer, self.processor, self.spec.max_text_tokens)
        except media.MediaError as e:
            raise RecordError("unreadable media", f"{role}: {_without_item_prefix(e)}") from e
        except (ValueError, TypeError, OSError) as e:
            raise RecordError("invalid record", f"{role}: {_without_item_prefix(e)}") from e
        problem = fit_problem(packable, self.spec, role)
        if problem:
            raise RecordError("too long", f"{role}: {problem}")
        return packable


def _without_item_prefix(error: Exception) -> str:
    """prepare_item's message without its 'item 0: ' prefix (records are named by file:line instead)."""
    message = str(error)
    return message.removeprefix("item 0: ")


def fit_problem(item: PackableInput, spec: BatchSpec, stream: str = "query") -> str | None:
    """Why `item` cannot fill one row of `stream` in the static batch, or None when it fits (vision first)."""
    sizes = [h * w for (t, h, w) in item.grids for _ in range(t)]
    row_budget = spec.stream_row_budget(stream)
    if sizes and row_budget == 0:
        return (f"{len(item.grids)} image(s)/video(s), but data.{stream}_patches_per_row=0 makes this stream "
                "text only (unset it, or set a multiple of data.vision_block)")
    largest = max(sizes, default=0)
    if largest > spec.vision_block:
        return (f"a frame of {largest} patches exceeds data.vision_block={spec.vision_block} "
                "(raise data.vision_block or lower data.max_pixels)")
    tiles = first_fit(sizes, spec.vision_block)[1]
    if tiles * spec.vision_block > row_budget:
        setting = "data.patches_per_row" if row_budget == spec.patches_per_row else f"data.{stream}_patches_per_row"
        return (f"{sum(sizes)} patches need {tiles} vision tiles of {spec.vision_block}, more than "
                f"{setting}={row_budget} (raise it or lower the pixel budget / frame count)")
    if item.num_tokens > spec.seq_len:
        return (f"{item.num_tokens} tokens after text truncation, more than data.seq_len={spec.seq_len} "
                "(raise data.seq_len, or lower data.max_text_tokens / the pixel budget)")
    return None


def _empty_row(pad_id: int) -> PackableInput:
    """A row holding a lone <|endoftext|>: the stand-in for a missing hard negative."""
    return PackableInput(np.asarray([pad_id], np.int32), [], [], [])


def pack_examples(examples: list[PreparedExample], spec: BatchSpec,
                  allocate: Callable[[tuple, Any], np.ndarray] = np.zeros) -> tuple[dict, int]:
    """Exactly spec.local_batch_size examples -> (the batch arrays of the module docstring, non-pad tokens).

    allocate(shape, dtype) makes the all-zero patch buffers (the bulk of a batch): in worker
    processes, shared memory that the main process maps without a copy.
    """
    if len(examples) != spec.local_batch_size:
        raise ValueError(f"pack_examples: {len(examples)} examples for a batch of {spec.local_batch_size}")
    c, s, b, length = spec.num_chunks, spec.local_shards, spec.rows_per_shard, spec.seq_len
    streams = ("query", "candidate") + (("negative",) if spec.hard_negatives else ())
    arrays: dict[str, Any] = {}
    num_tokens = 0
    for stream in streams:
        present = np.asarray([getattr(e, stream) is not None for e in examples])
        items = [getattr(e, stream) if p else _empty_row(spec.pad_id) for e, p in zip(examples, present)]
        budget = spec.stream_patch_budget(stream)
        # a text-only stream's empty buffer stays a plain array (shared memory cannot be empty)
        patches = (allocate if budget else np.zeros)((c, s, budget, spec.patch_dim), np.dtype(spec.patch_dtype))
        packed = pack_batch(items, num_shards=c * s, rows_per_shard=b, seq_len=length,
                            patch_budget=budget, pad_id=spec.pad_id, patch_dim=spec.patch_dim,
                            merge_size=spec.merge_size, position_mode=spec.position_mode,
                            vision_block=spec.vision_block, share_tiles=False,
                            patches_out=patches.reshape(c * s, budget, spec.patch_dim))
        num_tokens += int(packed["attention_mask"][present].sum())
        arrays[stream] = {key: packed[key].reshape(c, packed[key].shape[0] // c, *packed[key].shape[1:])
                          for key in BATCH_KEYS}  # explicit sizes: a text-only stream's arrays are empty
        arrays[stream]["patches"] = patches  # the buffer itself (a shared-memory array stays one)
    arrays["candidate_modality"] = np.asarray([e.target_modal for e in examples], np.int32).reshape(c, s * b)
    if spec.hard_negatives:
        arrays["negative_modality"] = np.asarray([e.negative_modal for e in examples], np.int32).reshape(c, s * b)
    arrays["valid"] = np.ones((c, s * b), bool)
    return arrays, num_tokens


# --------------------------------------------------------------------------- sources and order


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


# --------------------------------------------------------------------------- batching (runs in workers)


class _BatchingDataset(grain.IterDataset):
    """Index stream -> one packed local batch per element (or a report of skipped records).

    Element: {"arrays": dict or None, "bad": [[where, kind, message], ...], "wheres": [...],
              "num_good": int, "num_tokens": int}.
    `set_slice` lets mp_prefetch give each worker every num_workers-th index of the stream.
    """

    def __init__(self, parent: grain.MapDataset, sources: list[RecordSource], builder: ExampleBuilder, *,
                 same_source: bool, num_threads: int, strict: bool):
        super().__init__(parent)
        self._sources = sources
        self._builder = builder
        self._same_source = same_source
        self._num_threads = num_threads
        self._strict = strict
        self.shared_memory = False  # set when the batches are made in worker processes

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        del sequential_slice  # the index stream is cheap to address; plain strided slices suffice
        self._parents = (self._parents[0].slice(sl),)

    def __iter__(self) -> _BatchingIterator:
        return _BatchingIterator(self._parents[0], self._sources, self._builder, same_source=self._same_source,
                                 num_threads=self._num_threads, strict=self._strict,
                                 shared_memory=self.shared_memory)

    def __str__(self) -> str:
        return f"_BatchingDataset(same_source={self._same_source}, num_threads={self._num_threads})"


class _BatchingIterator(grain.DatasetIterator):
    """Fills a batch with good examples, taking indices from the stream in order.

    Indices taken but not yet emitted wait in `pending` (per source with same_source batches, else
    one group); the state is (next stream index, pending indices, skipped records not yet reported),
    so a restored iterator re-reads the pending records and continues identically.
    """

    def __init__(self, index_ds: grain.MapDataset, sources: list[RecordSource], builder: ExampleBuilder, *,
                 same_source: bool, num_threads: int, strict: bool, shared_memory: bool = False):
        super().__init__()
        self._allocate = _shared_zeros if shared_memory else np.zeros
        self._index_ds = index_ds
        self._sources = sources
        self._builder = builder
        self._same_source = same_source
        self._strict = strict
        self._batch_size = builder.spec.local_batch_size
        self._next_index = 0
        self._pending: dict[int, list[int]] = {}
        self._bad: list[BadRecord] = []
        self._prepared: dict[int, PreparedExample] = {}  # stream index -> example, of the last group only
        self._pool = concurrent.futures.ThreadPoolExecutor(num_threads) if num_threads > 1 else None

    def _take_group(self) -> int:
        """Takes indices until one group holds a batch's worth; returns its key."""
        if not self._same_source:
            group = self._pending.setdefault(0, [])
            while len(group) < self._batch_size:
                group.append(self._next_index)
                self._next_index += 1
            return 0
        while True:
            index = self._next_index
            self._next_index += 1
            source, _ = self._index_ds[index]
            group = self._pending.setdefault(source, [])
            group.append(index)
            if len(group) >= self._batch_size:
                return source

    def _build(self, index: int) -> PreparedExample | BadRecord | None:
        source, record = self._index_ds[index]
        return self._builder.build(self._sources[source], record)

    def __next__(self) -> dict:
        while True:
            key = self._take_group()
            group = self._pending[key]
            todo = [i for i in group if i not in self._prepared]
            results = self._pool.map(self._build, todo) if self._pool else map(self._build, todo)
            for index, result in zip(todo, results):
                if isinstance(result, BadRecord):
                    self._bad.append(result)
                elif result is not None:
                    self._prepared[index] = result
            good = [i for i in group if i in self._prepared]
            # Keep prepared examples of this group only: memory stays at one batch of media.
            self._prepared = {i: self._prepared[i] for i in good}
            if len(good) == self._batch_size:
                examples = [self._prepared[i] for i in good]
                del self._pending[key]
                self._prepared = {}
                arrays, num_tokens = pack_examples(examples, self._builder.spec, self._allocate)
                return self._output(arrays, examples, num_tokens)
            self._pending[key] = good
            if self._bad and (self._strict or len(self._bad) >= REPORT_EVERY):
                return self._output(None, [], 0)

    def _output(self, arrays: dict | None, examples: list[PreparedExample], num_tokens: int) -> dict:
        bad, self._bad = self._bad, []
        return {"arrays": arrays, "bad": [[b.where, b.kind, b.message] for b in bad],
                "wheres": [e.where for e in examples], "num_good": len(examples), "num_tokens": num_tokens}

    def get_state(self) -> dict:
        return {"next_index": self._next_index,
                "pending": {str(k): list(v) for k, v in self._pending.items() if v},
                "bad": [[b.where, b.kind, b.message] for b in self._bad]}

    def set_state(self, state: dict) -> None:
        self._next_index = int(state["next_index"])
        self._pending = {int(k): [int(i) for i in v] for k, v in state["pending"].items()}
        self._bad = [BadRecord(*b) for b in state["bad"]]
        self._prepared = {}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def __str__(self) -> str:
        return f"_BatchingIterator(next_index={self._next_index})"


def _shared_zeros(shape: tuple, dtype) -> np.ndarray:
    """An all-zero array in shared memory (fresh shared memory reads as zeros): Grain passes it to the
    main process by name instead of copying it."""
    return grain.multiprocessing.SharedMemoryArray(shape, dtype)


def _mark_absl_flags_parsed() -> None:
    """Grain reads its absl flags when it starts workers; outside `absl.app.run` they are unparsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _worker_init(worker_index: int, worker_count: int) -> None:
    """Runs first in each spawned worker (a fresh interpreter: its absl flags are unparsed too)."""
    del worker_index, worker_count
    _mark_absl_flags_parsed()


# --------------------------------------------------------------------------- main-process iterator


@dataclasses.dataclass
class HostBatch:
    """One process-local training batch on the host.

    arrays: the nested numpy dict of the module docstring; bad_records: (where, reason) of the
    skipped records first seen since the previous batch; num_examples: C*S*b; num_tokens: non-pad
    tokens over all streams; example_wheres: where each example came from, in batch order.
    """

    arrays: dict
    bad_records: list[tuple[str, str]]
    num_examples: int
    num_tokens: int
    example_wheres: list[str]


class TrainBatchIterator:
    """Infinite iterator of HostBatch; checkpointable with get_state / set_state.

    Counts every record it consumes, logs each skipped record once (`where: kind: message`), raises
    DataError at the first skipped record with data.strict, and when skipped / seen exceeds
    data.max_bad_fraction once data.bad_fraction_min_records records (or one pass over this
    process's records, if fewer) were seen. Skipped counts both bad input and valid records that do
    not fit the static shapes ("too long") or lack a required negative.
    """

    def __init__(self, dataset: grain.IterDataset, *, fingerprint: dict, strict: bool, max_bad_fraction: float,
                 min_records: int, records_per_pass: int, spec: BatchSpec):
        self._dataset = dataset
        self._iterator = iter(dataset)
        self._fingerprint = fingerprint
        self._strict = strict
        self._max_bad_fraction = max_bad_fraction
        self._min_records = min(min_records, records_per_pass)
        self._records_per_pass = records_per_pass
        self.spec = spec
        self._stats = {"records_seen": 0, "examples": 0, "batches": 0, "bad": 0, "dropped": 0,
                       "by_reason": collections.Counter()}
        self._logged: set[str] = set()
        self._first_bad: BadRecord | None = None

    def __iter__(self) -> TrainBatchIterator:
        return self

    def __next__(self) -> HostBatch:
        while True:
            try:
                out = next(self._iterator)
            except DataError:
                raise
            except StopIteration:
                raise
            except Exception as e:  # a worker's crash arrives here, rebuilt by Grain with its traceback
                raise DataError(f"the training data pipeline failed: {type(e).__name__}: {e}") from e
            new_bad = self._account(out)
            if out["arrays"] is None:
                continue
            self._stats["batches"] += 1
            return HostBatch(out["arrays"], new_bad, out["num_good"], out["num_tokens"], list(out["wheres"]))

    def _account(self, out: dict) -> list[tuple[str, str]]:
        stats = self._stats
        bad = [BadRecord(*b) for b in out["bad"]]
        stats["records_seen"] += out["num_good"] + len(bad)
        stats["examples"] += out["num_good"]
        new = []
        for record in bad:
            stats["dropped" if record.is_drop else "bad"] += 1
            stats["by_reason"][record.kind] += 1
            self._first_bad = self._first_bad or record
            if record.where not in self._logged:
                self._logged.add(record.where)
                log.warning("%s: %s", record.where, record.reason)
                new.append((record.where, record.reason))
        if bad and self._strict:
            first = bad[0]
            raise DataError(f"{first.where}: {first.reason} (data.strict=True stops at the first bad record; "
                            "set data.strict=False to skip and count bad records)")
        seen, skipped = stats["records_seen"], stats["bad"] + stats["dropped"]
        if stats["examples"] == 0 and seen >= 2 * self._records_per_pass:
            # otherwise an all-bad source with a lenient max_bad_fraction would be read forever
            raise DataError(f"no usable record in two passes over this process's {self._records_per_pass} records "
                            f"({dict(stats['by_reason'])}){self._first_bad_text()}")
        if seen >= max(self._min_records, 1) and skipped > self._max_bad_fraction * seen:
            top = ", ".join(f"{kind}: {n}" for kind, n in stats["by_reason"].most_common(5))
            raise DataError(f"{skipped} of {seen} training records skipped ({skipped / seen:.1%}), more than "
                            f"data.max_bad_fraction={self._max_bad_fraction} ({top}){self._first_bad_text()}. Fix "
                            "the data, or raise data.max_bad_fraction")
        return new

    def _first_bad_text(self) -> str:
        first = self._first_bad
        return f"; first: {first.where}: {first.reason}" if first else ""

    @property
    def stats(self) -> dict:
        """records_seen, examples, batches, bad (bad input), dropped (too long / no negative), by_reason."""
        out = dict(self._stats)
        out["by_reason"] = dict(self._stats["by_reason"])
        return out

    def get_state(self) -> dict:
        """JSON-serialisable position after the last batch returned (plus the counters)."""
        # The records already logged travel too, so a resumed run neither logs nor reports them again
        # (capped: past the cap, a resumed run may log a record a second time).
        logged = sorted(self._logged)[:MAX_LOGGED_IN_STATE]
        return {"version": STATE_VERSION, "fingerprint": dict(self._fingerprint),
                "pipeline": self._iterator.get_state(), "stats": self.stats, "logged": logged}

    def set_state(self, state: dict) -> None:
        """Continues from `state` (also on a fresh iterator in a new process, with the same settings)."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise DataError(f"data iterator state: expected version {STATE_VERSION}, got "
                            f"{state.get('version') if isinstance(state, dict) else type(state).__name__}")
        saved = state["fingerprint"]
        differ = sorted(k for k in set(saved) | set(self._fingerprint) if saved.get(k) != self._fingerprint.get(k))
        if differ:
            details = ", ".join(f"{k}: saved {saved.get(k)!r}, now {self._fingerprint.get(k)!r}" for k in differ)
            raise DataError(f"data iterator state was saved with other data settings ({details}); the same "
                            "sources, seed, batch size, workers and process layout are needed to resume")
        self._iterator.set_state(state["pipeline"])
        stats = state["stats"]
        self._stats = {key: stats[key] for key in ("records_seen", "examples", "batches", "bad", "dropped")}
        self._stats["by_reason"] = collections.Counter(stats["by_reason"])
        self._logged = set(state.get("logged", []))

    def close(self) -> None:
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> TrainBatchIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_train_iterator(data_cfg, spec: BatchSpec, tokenizer: PromptTokenizer, processor: media.ProcessorConfig,
                         *, seed: int, process_index: int, process_count: int) -> TrainBatchIterator:
    """The infinite, checkpointable iterator of this process's training batches.

    process_index / process_count: this process's place in the run (jax.process_index() / count() in
    the trainer; the data layer does not import jax).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if spec.pad_id != tokenizer.pad_id:
        raise ValueError(f"BatchSpec.pad_id {spec.pad_id} differs from the tokenizer's <|endoftext|> id "
                         f"{tokenizer.pad_id}")
    if (spec.patch_dim, spec.merge_size) != (processor.patch_dim, processor.merge_size):
        raise ValueError(f"BatchSpec patch_dim/merge_size {spec.patch_dim}/{spec.merge_size} differ from the "
                         f"processor's {processor.patch_dim}/{processor.merge_size}")
    if not 0 <= float(data_cfg.max_bad_fraction) <= 1:
        raise ValueError(f"data.max_bad_fraction must be in [0, 1], got {data_cfg.max_bad_fraction}")
    sources, weights = open_sources(data_cfg)
    index_ds = index_dataset([len(s) for s in sources], weights, seed=seed, shuffle=bool(data_cfg.shuffle),
                             process_index=process_index, process_count=process_count,
                             names=[s.name for s in sources])
    builder = ExampleBuilder(tokenizer, processor, spec, str(data_cfg.missing_negative))
    dataset = _BatchingDataset(index_ds, sources, builder, same_source=bool(data_cfg.same_source_batches),
                               num_threads=max(1, int(data_cfg.num_threads)), strict=bool(data_cfg.strict))
    num_workers = int(data_cfg.num_workers)
    if num_workers > 0:
        _mark_absl_flags_parsed()
        dataset.shared_memory = True
        options = grain.MultiprocessingOptions(num_workers=num_workers,
                                               per_worker_buffer_size=max(1, int(data_cfg.worker_buffer_size)))
        dataset = dataset.mp_prefetch(options, worker_init_fn=_worker_init)
    records_per_pass = sum(len(range(process_index, len(s), process_count)) for s in sources)
    fingerprint = {"train": str(data_cfg.train), "seed": int(seed), "shuffle": bool(data_cfg.shuffle),
                   "same_source_batches": bool(data_cfg.same_source_batches), "num_workers": num_workers,
                   "local_batch_size": spec.local_batch_size, "process_index": int(process_index),
                   "process_count": int(process_count), "records": [len(s) for s in sources]}
    return TrainBatchIterator(dataset, fingerprint=fingerprint, strict=bool(data_cfg.strict),
                              max_bad_fraction=float(data_cfg.max_bad_fraction),
                              min_records=int(data_cfg.bad_fraction_min_records),
                              records_per_pass=records_per_pass, spec=spec)


# --------------------------------------------------------------------------- device prefetch


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class DevicePrefetcher:
    """Background thread: next batch -> put_fn(arrays), `size` batches ahead of the consumer.

    Yields (put_fn(batch.arrays), batch, state) where `state` is the iterator's state right after
    that batch: checkpoint the state of the last batch the step consumed, not the iterator's.
    An exception in the thread is re-raised (the same object, with its cause) in the consumer.
    """

    def __init__(self, iterator: TrainBatchIterator, put_fn: Callable[[dict], Any], size: int = 2):
        if size < 1:
            raise ValueError(f"prefetch size must be >= 1, got {size}")
        self._iterator = iterator
        self._put_fn = put_fn
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name="unite-data-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                batch = next(self._iterator)
                state = self._iterator.get_state()
                if not self._offer((self._put_fn(batch.arrays), batch, state)):
                    return
        except BaseException as e:  # noqa: BLE001 - everything, StopIteration included, goes to the consumer
            self._offer(_Failure(e))

    def _offer(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> tuple[Any, HostBatch, dict]:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, _Failure):
            self._done = True
            raise item.error
        return item

    def close(self) -> None:
        """Stops the thread (the wrapped iterator is left open: close it yourself)."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=60)

    def __enter__(self) -> DevicePrefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def prefetch_to_device(iterator: TrainBatchIterator, put_fn: Callable[[dict], Any],
                       size: int = 2) -> DevicePrefetcher:
    """Iterates (put_fn(batch.arrays), batch, state_after_batch) with `size` batches prepared ahead."""
    return DevicePrefetcher(iterator, put_fn, size)


__all__ = ["BAD_INPUT_KINDS", "DROP_KINDS", "BatchSpec", "DataError", "DevicePrefetcher", "ExampleBuilder",
           "HostBatch", "PreparedExample", "TrainBatchIterator", "build_train_iterator", "default_data_config",
           "fit_problem", "index_dataset", "make_processor", "open_sources", "pack_examples",
           "prefetch_to_device", "processor_overrides"]
