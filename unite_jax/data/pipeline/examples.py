"""Training examples: a record's query / candidate / negative prepared (`prepare_item`), checked against the
static batch shape (`fit_problem`), and packed into one local batch (`pack_examples`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from unite_jax.data import media
from unite_jax.data.items import prepare_item
from unite_jax.data.manifest import RecordSource
from unite_jax.data.packing import BATCH_KEYS, PackableInput, first_fit, pack_batch
from unite_jax.data.records import BadRecord, Example, RecordError
from unite_jax.data.spec import BatchSpec
from unite_jax.data.tokenize import PromptTokenizer


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
