"""Model configuration: the architecture, read from a Hugging Face Qwen2-VL config.json.

`ModelConfig` is a frozen, hashable dataclass so it can be a static argument of
`jax.jit`. It holds what the checkpoint fixes (widths, depths, heads, special token
ids) and nothing else: how a run computes with those weights (dtypes, remat,
attention kernel, LoRA, the vision tile) is `RunOptions` (model/options.py), passed
alongside it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Qwen2-VL vision tower (ViT with 2-D rotary and a 2x2 patch merger)."""

    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: float = 4.0
    hidden_act: str = "quick_gelu"
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 1536  # merger output = LLM hidden size
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: channels * temporal * patch * patch (1176)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merge_unit(self) -> int:
        """Patches fused into one LLM token (4 for a 2x2 merge)."""
        return self.spatial_merge_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Qwen2 decoder."""

    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_layers: int = 28
    num_heads: int = 12
    num_kv_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: tuple[int, ...] = (16, 24, 24)
    tie_word_embeddings: bool = True
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of the UNITE embedder (a Qwen2-VL checkpoint)."""

    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    def __post_init__(self):
        if sum(self.text.mrope_section) * 2 != self.text.head_dim:
            raise ValueError(
                f"mrope_section {self.text.mrope_section} must sum to head_dim/2 = {self.text.head_dim // 2}"
            )
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError(
                f"vision merger output ({self.vision.out_hidden_size}) must equal the LLM hidden size "
                f"({self.text.hidden_size})"
            )

    @property
    def hidden_size(self) -> int:
        """Embedding dimension."""
        return self.text.hidden_size

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF I/O
    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        """Reads a Qwen2-VL config dict, transformers 4.x (flat) or 5.x (`text_config`) layout."""
        return cls(vision=_vision_from_hf(hf), text=_text_from_hf(hf), **_token_ids_from_hf(hf))

    @classmethod
    def from_pretrained(cls, model_dir: str) -> "ModelConfig":
        path = os.path.join(model_dir, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{model_dir}: no config.json (expected a Hugging Face Qwen2-VL directory)")
        try:
            with open(path) as f:
                hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from e
        model_type = hf.get("model_type")
        if model_type not in (None, "qwen2_vl"):
            raise ValueError(f"{path}: field 'model_type' is {model_type!r}, expected 'qwen2_vl'")
        try:
            return cls.from_hf_dict(hf)
        except KeyError as e:
            raise ValueError(f"{path}: missing field {e.args[0]!r}") from e

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers-5.x-style config dict that both 4.x and 5.x can load."""
        t, v = self.text, self.vision
        text = {
            "model_type": "qwen2_vl_text",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads,
            "hidden_act": t.hidden_act,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                                "mrope_section": list(t.mrope_section)},
            "tie_word_embeddings": t.tie_word_embeddings,
        }
        vision = {
            "model_type": "qwen2_vl_vision",
            "depth": v.depth,
            "embed_dim": v.embed_dim,
            "hidden_size": v.out_hidden_size,
            "hidden_act": v.hidden_act,
            # transformers 5.x validates mlp_ratio as an int (Qwen2-VL's is 4)
            "mlp_ratio": int(v.mlp_ratio) if float(v.mlp_ratio).is_integer() else v.mlp_ratio,
            "num_heads": v.num_heads,
            "in_channels": v.in_channels,
            "patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size,
        }
        return {
            "architectures": ["Qwen2VLForConditionalGeneration"],
            "model_type": "qwen2_vl",
            "text_config": text,
            "vision_config": vision,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": t.tie_word_embeddings,
            # flat copies for transformers 4.x readers
            **{k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                     "num_attention_heads", "num_key_value_heads", "rms_norm_eps")},
            "rope_theta": t.rope_theta,
            "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
        }


def _rope_settings(section: Mapping[str, Any], root: Mapping[str, Any]) -> tuple[float, tuple[int, ...]]:
    """rope theta and mrope sections from `rope_parameters` (5.x) or `rope_scaling`/`rope_theta` (4.x)."""
    rope = section.get("rope_parameters") or section.get("rope_scaling") or \
        root.get("rope_parameters") or root.get("rope_scaling") or {}
    theta = rope.get("rope_theta", section.get("rope_theta", root.get("rope_theta", 1e6)))
    mrope = tuple(int(s) for s in rope.get("mrope_section", (16, 24, 24)))
    return float(theta), mrope


def _text_from_hf(hf: Mapping[str, Any]) -> TextConfig:
    # 5.x nests the LLM settings in text_config; 4.x keeps them at the top level.
    section = hf.get("text_config") or hf
    if "hidden_size" not in section:
        section = hf
    theta, mrope = _rope_settings(section, hf)
    tie = hf.get("tie_word_embeddings", section.get("tie_word_embeddings", False))
    num_heads = int(section["num_attention_heads"])
    return TextConfig(
        vocab_size=int(section["vocab_size"]),
        hidden_size=int(section["hidden_size"]),
        intermediate_size=int(section["intermediate_size"]),
        num_layers=int(section["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(section.get("num_key_value_heads") or num_heads),
        rms_norm_eps=float(section.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        mrope_section=mrope,
        tie_word_embeddings=bool(tie or section.get("tie_word_embeddings", False)),
        hidden_act=section.get("hidden_act", "silu"),
    )


def _vision_from_hf(hf: Mapping[str, Any]) -> VisionConfig:
    v = hf["vision_config"]
    text_hidden = (hf.get("text_config") or {}).get("hidden_size", hf.get("hidden_size"))
    rope = v.get("rope_parameters") or {}
    return VisionConfig(
        depth=int(v.get("depth", 32)),
        embed_dim=int(v.get("embed_dim", 1280)),
        num_heads=int(v.get("num_heads", 16)),
        mlp_ratio=float(v.get("mlp_ratio", 4)),
        hidden_act=v.get("hidden_act", "quick_gelu"),
        in_channels=int(v.get("in_channels", v.get("in_chans", 3))),
        patch_size=int(v.get("patch_size", v.get("spatial_patch_size", 14))),
        temporal_patch_size=int(v.get("temporal_patch_size", 2)),
        spatial_merge_size=int(v.get("spatial_merge_size", 2)),
        # 4.x stores the merger output as vision_config.hidden_size too; fall back to the LLM width.
        out_hidden_size=int(v.get("hidden_size") or text_hidden),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
    )


def _token_ids_from_hf(hf: Mapping[str, Any]) -> dict[str, int]:
    defaults = ModelConfig()
    return {
        key: int(hf.get(key, getattr(defaults, key)))
        for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    }


# ---------------------------------------------------------------------- presets
def preset(name: str) -> ModelConfig:
    """Published shapes (`2b`, `7b`) and a `tiny` random-init model that runs on a CPU."""
    if name == "2b":
        return ModelConfig(
            vision=VisionConfig(out_hidden_size=1536),
            text=TextConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                            num_heads=12, num_kv_heads=2, tie_word_embeddings=True),
        )
    if name == "7b":
        return ModelConfig(
            vision=VisionConfig(out_hidden_size=3584),
            text=TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                            num_heads=28, num_kv_heads=4, tie_word_embeddings=False),
        )
    if name == "tiny":
        # The vocabulary size and special-token ids of the tiny test/demo tokenizer
        # (unite_jax.data.tiny_tokenizer; tests/test_model.py checks that they agree).
        return ModelConfig(
            vision=VisionConfig(depth=2, embed_dim=64, num_heads=4, mlp_ratio=2.0, out_hidden_size=64),
            text=TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                            num_layers=2, num_heads=4, num_kv_heads=2, mrope_section=(2, 3, 3),
                            tie_word_embeddings=True),
            image_token_id=5,
            video_token_id=6,
            vision_start_token_id=3,
            vision_end_token_id=4,
        )
    raise ValueError(f"unknown model preset {name!r}; expected one of '2b', '7b', 'tiny'")
