"""Device prefetch: a background thread turns the next batches into device arrays ahead of the step."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from unite_jax.data.pipeline.iterator import HostBatch, TrainBatchIterator


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
