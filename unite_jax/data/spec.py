"""What the training data looks like: the `data.*` config keys and the static shape of a batch.

Kept apart from the Grain pipeline (and free of grain and jax imports) so that configs and any
code that only needs the settings stay light. The batch layout itself is documented in
`unite_jax.data.pipeline`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
import numpy as np

from unite_jax.data import media
from unite_jax.data.tfds_source import ROLES as TFDS_ROLES

PATCH_DTYPES = ("uint8", "float32")
STREAMS = ("query", "candidate", "negative")
# ProcessorConfig fields that data.* may override (0 = keep the model directory's value).
PROCESSOR_OVERRIDES = ("min_pixels", "max_pixels", "video_fps", "video_min_frames", "video_max_frames",
                       "video_max_pixels")


def default_data_config() -> ml_collections.ConfigDict:
    """Every `data.*` key the pipeline reads, with its default."""
    cfg = ml_collections.ConfigDict()
    # Sources: comma-separated manifests (.json array / .jsonl) or tfds:NAME[/CONFIG]:SPLIT, each @weight.
    cfg.train = ""
    cfg.media_root = ""  # relative media paths are joined to this; "" = the manifest's own directory
    cfg.strict = False  # True: the first bad record stops the run
    cfg.max_bad_fraction = 0.01  # stop when skipped / seen records exceeds this ...
    cfg.bad_fraction_min_records = 100  # ... once this many records were seen (or one pass, if smaller)
    cfg.num_workers = 0  # worker processes (Grain mp_prefetch); 0 = in this process
    cfg.worker_buffer_size = 2  # batches each worker prepares ahead
    cfg.num_threads = 1  # threads preparing the examples of a batch, per worker (or in-process)
    cfg.shuffle = True
    cfg.same_source_batches = False  # True: every batch holds examples of one data.train entry only
    cfg.hard_negatives = False  # True: batches carry each example's `negative`
    cfg.missing_negative = "mask"  # with hard negatives, an example without one: "mask" or "drop"
    cfg.max_text_tokens = 2048  # user text cap per input (vision blocks and the template are never cut)
    cfg.seq_len = 2048  # static row length in tokens, vision tokens included
    cfg.patches_per_row = 5120  # static patch budget of one example (one row), whole vision tiles
    cfg.vision_block = 5120  # vision attention tile in patches: a multiple of 4 dividing patches_per_row
    # "uint8": patches travel as pixel levels and the train step normalises them on the device (the
    # same bits, a quarter of the bytes); "float32": normalised on the host
    cfg.patch_dtype = "uint8"
    # Patch budget of one example per stream: unset (None) = patches_per_row; 0 = text only (no patch buffer,
    # no vision tower pass for that stream; an example with media there is dropped); else a multiple of
    # vision_block.
    cfg.query_patches_per_row = ml_collections.config_dict.placeholder(int)
    cfg.candidate_patches_per_row = ml_collections.config_dict.placeholder(int)
    cfg.negative_patches_per_row = ml_collections.config_dict.placeholder(int)
    cfg.tfds_data_dir = ""  # data_dir of tfds: sources ("" = TFDS's default)
    cfg.tfds_fields = ml_collections.ConfigDict({role: "" for role in TFDS_ROLES})  # role -> feature name
    # Pre-processing overrides, 0 = the model directory's preprocessor_config.json value.
    cfg.min_pixels = 0
    cfg.max_pixels = 0
    cfg.video_fps = 0.0
    cfg.video_min_frames = 0
    cfg.video_max_frames = 0
    cfg.video_max_pixels = 0
    return cfg


def processor_overrides(data_cfg) -> dict[str, Any]:
    """The ProcessorConfig fields set in data_cfg (non-zero), for `ProcessorConfig.from_pretrained(dir, **...)`."""
    return {name: data_cfg[name] for name in PROCESSOR_OVERRIDES if data_cfg.get(name)}


def make_processor(model_dir: str, data_cfg) -> media.ProcessorConfig:
    """The model directory's pre-processing settings with the data_cfg overrides applied."""
    return media.ProcessorConfig.from_pretrained(model_dir, **processor_overrides(data_cfg))


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """Static shape of one process-local training batch (see the module docstring for the layout)."""

    num_chunks: int  # C: GradCache chunks
    local_shards: int  # S: data shards on this process's devices
    rows_per_shard: int  # b: rows (examples) per shard per chunk
    seq_len: int  # L: tokens per row, vision tokens included
    patches_per_row: int  # patch budget of one example, in whole vision tiles
    vision_block: int  # vision attention tile, in patches
    hard_negatives: bool
    max_text_tokens: int | None  # user text cap per input (None or 0: no cap)
    pad_id: int  # <|endoftext|>
    patch_dim: int  # 3 * temporal_patch * patch**2 (1176)
    merge_size: int = 2
    position_mode: str = "sequential"  # or "mrope"
    patch_dtype: str = "uint8"  # or "float32" (see default_data_config)
    # Per-stream patch budgets (query, candidate, negative): None = patches_per_row; 0 = the stream is text
    # only and its batch carries no patches, so the vision tower does not run for it. Resolved to numbers.
    stream_patches_per_row: tuple[int | None, int | None, int | None] = (None, None, None)

    def __post_init__(self):
        if not self.max_text_tokens:  # 0 (a config value) means no cap, as None does
            object.__setattr__(self, "max_text_tokens", None)
        for name in ("num_chunks", "local_shards", "rows_per_shard", "seq_len", "patches_per_row", "vision_block",
                     "patch_dim", "merge_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"BatchSpec.{name}: expected a positive integer, got {value!r}")
        unit = self.merge_size**2
        if self.vision_block % unit or self.patches_per_row % self.vision_block:
            raise ValueError(f"data.vision_block ({self.vision_block}) must be a multiple of {unit} and divide "
                             f"data.patches_per_row ({self.patches_per_row})")
        if self.position_mode not in ("sequential", "mrope"):
            raise ValueError(f"BatchSpec.position_mode: expected 'sequential' or 'mrope', got {self.position_mode!r}")
        if self.patch_dtype not in PATCH_DTYPES:
            raise ValueError(f"data.patch_dtype: expected one of {PATCH_DTYPES}, got {self.patch_dtype!r}")
        for stream, value in zip(STREAMS, self.stream_patches_per_row):
            if value is not None and (isinstance(value, bool) or value < 0 or value % self.vision_block):
                raise ValueError(f"data.{stream}_patches_per_row: expected None (unset: data.patches_per_row), 0 "
                                 f"(text only) or a multiple of data.vision_block={self.vision_block}, got {value}")
        object.__setattr__(self, "stream_patches_per_row", tuple(
            self.patches_per_row if value is None else int(value) for value in self.stream_patches_per_row))

    @property
    def local_batch_size(self) -> int:
        """Examples per process-local batch: C * S * b."""
        return self.num_chunks * self.local_shards * self.rows_per_shard

    @property
    def patch_budget(self) -> int:
        """P: patches per shard row of a batch (b * patches_per_row)."""
        return self.rows_per_shard * self.patches_per_row

    def stream_row_budget(self, stream: str) -> int:
        """Patches one example may use in `stream` ("query", "candidate" or "negative"); 0 = text only."""
        return self.stream_patches_per_row[STREAMS.index(stream)]

    def stream_patch_budget(self, stream: str) -> int:
        """P of `stream`: patches per shard row of its batch (b * its per-example budget)."""
        return self.rows_per_shard * self.stream_row_budget(stream)

    @classmethod
    def from_config(cls, data_cfg, *, num_chunks: int, local_shards: int, rows_per_shard: int, pad_id: int,
                    patch_dim: int, merge_size: int = 2, position_mode: str = "sequential") -> BatchSpec:
        """The data.* shape settings (seq_len, patches_per_row, vision_block, hard_negatives, max_text_tokens)."""
        return cls(num_chunks=num_chunks, local_shards=local_shards, rows_per_shard=rows_per_shard,
                   seq_len=int(data_cfg.seq_len), patches_per_row=int(data_cfg.patches_per_row),
                   vision_block=int(data_cfg.vision_block), hard_negatives=bool(data_cfg.hard_negatives),
                   max_text_tokens=int(data_cfg.max_text_tokens), pad_id=pad_id, patch_dim=patch_dim,
                   merge_size=merge_size, position_mode=position_mode,
                   patch_dtype=str(data_cfg.get("patch_dtype", "uint8")),
                   stream_patches_per_row=tuple(data_cfg.get(f"{stream}_patches_per_row") for stream in STREAMS))
