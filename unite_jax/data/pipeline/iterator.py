"""The main process's side: `TrainBatchIterator` accounts for skipped records (strict mode, the bad-record
budget), logs each once and checkpoints its position; `build_train_iterator` assembles the pipeline."""

from __future__ import annotations

import collections
import dataclasses
import logging

import grain

from unite_jax.data import media
from unite_jax.data.pipeline.examples import ExampleBuilder
from unite_jax.data.pipeline.sources import index_dataset, open_sources
from unite_jax.data.pipeline.workers import BatchingDataset, mark_absl_flags_parsed, worker_init
from unite_jax.data.records import BadRecord, DataError
from unite_jax.data.spec import BatchSpec
from unite_jax.data.tokenize import PromptTokenizer

log = logging.getLogger(__name__)

STATE_VERSION = 1
MAX_LOGGED_IN_STATE = 10_000



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
    dataset = BatchingDataset(index_ds, sources, builder, same_source=bool(data_cfg.same_source_batches),
                               num_threads=max(1, int(data_cfg.num_threads)), strict=bool(data_cfg.strict))
    num_workers = int(data_cfg.num_workers)
    if num_workers > 0:
        mark_absl_flags_parsed()
        dataset.shared_memory = True
        options = grain.MultiprocessingOptions(num_workers=num_workers,
                                               per_worker_buffer_size=max(1, int(data_cfg.worker_buffer_size)))
        dataset = dataset.mp_prefetch(options, worker_init_fn=worker_init)
    records_per_pass = sum(len(range(process_index, len(s), process_count)) for s in sources)
    fingerprint = {"train": str(data_cfg.train), "seed": int(seed), "shuffle": bool(data_cfg.shuffle),
                   "same_source_batches": bool(data_cfg.same_source_batches), "num_workers": num_workers,
                   "local_batch_size": spec.local_batch_size, "process_index": int(process_index),
                   "process_count": int(process_count), "records": [len(s) for s in sources]}
    return TrainBatchIterator(dataset, fingerprint=fingerprint, strict=bool(data_cfg.strict),
                              max_bad_fraction=float(data_cfg.max_bad_fraction),
                              min_records=int(data_cfg.bad_fraction_min_records),
                              records_per_pass=records_per_pass, spec=spec)
