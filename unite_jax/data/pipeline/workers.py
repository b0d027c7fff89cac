"""Batching, the part of the pipeline that runs in Grain worker processes: index stream -> one packed local
batch per element (or a report of skipped records), checkpointable."""

from __future__ import annotations

import concurrent.futures

import grain
import numpy as np

from unite_jax.data.manifest import RecordSource
from unite_jax.data.pipeline.examples import ExampleBuilder, PreparedExample, pack_examples
from unite_jax.data.records import BadRecord

# A worker that meets this many skipped records without completing a batch reports them anyway, so
# the main process can count them (and stop on data.max_bad_fraction) even when nothing is usable.
REPORT_EVERY = 64



class BatchingDataset(grain.IterDataset):
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
        return f"BatchingDataset(same_source={self._same_source}, num_threads={self._num_threads})"


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


def mark_absl_flags_parsed() -> None:
    """Grain reads its absl flags when it starts workers; outside `absl.app.run` they are unparsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def worker_init(worker_index: int, worker_count: int) -> None:
    """Runs first in each spawned worker (a fresh interpreter: its absl flags are unparsed too)."""
    del worker_index, worker_count
    mark_absl_flags_parsed()
