"""How a forward runs: options that change how the same weights are computed, never their shapes.

`ModelConfig` (model/config.py) is the architecture a checkpoint fixes; `RunOptions` is chosen per
run (dtypes, attention kernel, rematerialisation, LoRA scale and dropout, the vision tile of a
batch) and travels next to it:

    embed(params, batch, cfg, run, rng=None)

Both are frozen and hashable, so both are static arguments of `jax.jit`: each distinct value
compiles once. The defaults here are the one place where a platform picks its dtype and its
attention kernel.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

POSITION_MODES = ("sequential", "mrope")
ATTENTION_IMPLS = ("xla", "cudnn", "splash")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


@dataclasses.dataclass(frozen=True)
class LoraOptions:
    """LoRA on the LLM's linear layers (model/lora.py), for parameters that carry `lora_a` / `lora_b`.

    scale: alpha / rank, multiplies the LoRA branch (`lora.lora_scale`).
    dropout: inverted dropout on the LoRA branch input, applied when the forward is given an rng.
    """

    scale: float
    dropout: float = 0.0

    def __post_init__(self):
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale) \
                or self.scale == 0:
            raise ValueError(f"LoraOptions.scale (lora_scale = alpha / rank) must be a finite non-zero number, "
                             f"got {self.scale!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraOptions.dropout (lora_dropout) must lie in [0, 1), got {self.dropout!r}")


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How to compute the embedding (static: part of what a jitted forward compiles for).

    positions: "sequential" (UNITE's 1-D positions) or "mrope" (Qwen2-VL's 3-D positions); the packer
        writes the position ids, the model reads them.
    compute_dtype: matmul inputs; norms, softmax, rotary and the final embedding stay float32.
    param_dtype: the dtype parameters are loaded, initialised and exported in.
    attention_impl: "xla" (everywhere), "cudnn" (GPU, bf16/fp16) or "splash" (TPU Pallas kernels; Pallas
        interpret mode elsewhere, for tests).
    remat: per-layer rematerialisation policy ("none", "full", "dots", "dots_no_batch").
    scan_layers: run the stacked layers under `jax.lax.scan` (False: an unrolled loop, for debugging).
    vision_block: the vision attention tile in patches: the packer keeps every (media, temporal slice)
        inside one tile, so attention is exact at O(patches * vision_block) cost; None = one tile per
        packed row. Chosen per batch by the packer's shape buckets (`data.packing.choose_shapes`).
    lora: LoRA scale and dropout, or None (no LoRA: a parameter tree with LoRA leaves is an error).
    """

    positions: str = "sequential"
    compute_dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str = "xla"
    remat: str = "none"
    scan_layers: bool = True
    vision_block: int | None = None
    lora: LoraOptions | None = None

    def __post_init__(self):
        if self.positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {self.positions!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.vision_block is not None and (isinstance(self.vision_block, bool) or self.vision_block < 1):
            raise ValueError(f"vision_block must be a positive number of patches or None, got {self.vision_block!r}")

    def replace(self, **changes: Any) -> RunOptions:
        return dataclasses.replace(self, **changes)


def default_dtype(platform: str) -> str:
    """float32 on CPU (bit-faithful to the reference), bfloat16 on GPU and TPU."""
    return "float32" if platform == "cpu" else "bfloat16"


def default_attention(platform: str, compute_dtype: str) -> str:
    """The splash kernels on TPU, cuDNN's fused kernel on GPU in a 16-bit dtype (it needs one), the XLA
    reference everywhere else."""
    if platform == "tpu":
        return "splash"
    return "cudnn" if platform == "gpu" and compute_dtype != "float32" else "xla"
