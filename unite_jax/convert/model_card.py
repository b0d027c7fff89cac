"""The README.md model card written with every exported Hugging Face directory.

It says what the model is, how UNITE pools (the prompt, left padding,
sequential positions, last position, L2 normalisation), how to compute the
embedding with `transformers` alone, and where the weights came from. The
transformers snippet is executed by the tests against `Embedder`, so it stays
correct.
"""

from __future__ import annotations

import datetime
import json
from typing import Any, Mapping

from unite_jax.model.config import ModelConfig

# Placeholders in the snippet that a reader (and the tests) replace.
SNIPPET_PATH = "path/to/this/directory"
SNIPPET_IMAGE = "photo.jpg"

TRANSFORMERS_SNIPPET = f'''\
import re

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration

path = "{SNIPPET_PATH}"
model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()  # or bfloat16 on a GPU
tokenizer = AutoTokenizer.from_pretrained(path)
tokenizer.padding_side, tokenizer.pad_token = "left", "<|endoftext|>"
image_processor = AutoImageProcessor.from_pretrained(path)
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def unite_prompt(content, modalities):
    """modalities: "sentence", "image", "video", "sentence and image" or "sentence and video"."""
    return ("<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n"
            f"{{content.strip()}}\\nSummary above {{modalities}} in one word:<|im_end|>\\n"
            "<|im_start|>assistant\\n<|endoftext|>")


@torch.no_grad()
def embed(prompts, images=()):
    """L2-normalised UNITE embeddings [len(prompts), hidden]; `images` fill the IMAGE blocks in order."""
    pixel_values = grid = None
    if images:
        processed = image_processor(images=list(images), return_tensors="pt")
        pixel_values, grid = processed["pixel_values"], processed["image_grid_thw"]
        counts = iter((grid.prod(-1) // image_processor.merge_size**2).tolist())  # one pad per merged token
        prompts = [re.sub(r"<\\|image_pad\\|>", lambda _: "<|image_pad|>" * next(counts), p) for p in prompts]
    batch = tokenizer(prompts, padding=True, add_special_tokens=False, return_tensors="pt")
    embeds = model.model.language_model.embed_tokens(batch["input_ids"])
    if images:
        features = model.model.visual(pixel_values.to(embeds.dtype), grid_thw=grid).pooler_output
        slots = (batch["input_ids"] == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(slots, features.to(embeds.dtype))
    # position_ids=None: positions 0..L-1 over the left-padded row, pads included (UNITE's positions)
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    return torch.nn.functional.normalize(hidden.last_hidden_state[:, -1].float(), dim=-1)


texts = embed([unite_prompt("a dog catching a frisbee", "sentence")])
photos = embed([unite_prompt(IMAGE, "image"), unite_prompt(IMAGE + "\\nWhat is the dog doing?", "sentence and image")],
               images=[Image.open("{SNIPPET_IMAGE}"), Image.open("{SNIPPET_IMAGE}")])
print(texts @ photos.T)  # cosine similarities
'''


def model_card(cfg: ModelConfig, meta: Mapping[str, Any], *, dtype_name: str) -> str:
    """README.md text for an exported directory of `cfg` whose unite_model.json was `meta`."""
    t, v = cfg.text, cfg.vision
    lora = meta.get("lora")
    lora_line = "none"
    if lora:
        lora_line = (f"rank {lora.get('rank')}, alpha {lora.get('alpha')}, targets "
                     f"{', '.join(lora.get('targets') or []) or 'unspecified'}; merged into these weights")
    extra = meta.get("extra") or {}
    exported = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: feature-extraction",
        "tags: [qwen2_vl, unite, embedding, multimodal-retrieval]",
        "---",
        "",
        f"# UNITE multimodal embedder (Qwen2-VL, {t.hidden_size}-d)",
        "",
        "A UNITE universal multimodal embedding model: text, images, videos and their combinations map to "
        "one L2-normalised vector space (retrieval = dot product). The backbone is an unchanged "
        "`Qwen2VLForConditionalGeneration`; there is no projection head. Exported by unite-jax "
        "(`launch/convert.py`).",
        "",
        "| | |",
        "|---|---|",
        f"| embedding dimension | {t.hidden_size} |",
        f"| LLM layers / heads / KV heads | {t.num_layers} / {t.num_heads} / {t.num_kv_heads} |",
        f"| vocabulary | {t.vocab_size} (tied input/output embeddings: {str(t.tie_word_embeddings).lower()}) |",
        f"| vision tower | depth {v.depth}, width {v.embed_dim}, {v.num_heads} heads, "
        f"{v.patch_size}x{v.patch_size} patches, {v.spatial_merge_size}x{v.spatial_merge_size} merge |",
        f"| weights dtype | {dtype_name} |",
        "",
        "## How the embedding is computed (the UNITE recipe)",
        "",
        "1. Wrap every input, query or candidate alike, in this prompt (`{content}` stripped of surrounding "
        "whitespace):",
        "",
        "   ```",
        "   <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n{content}\\n"
        "Summary above {modalities} in one word:<|im_end|>\\n<|im_start|>assistant\\n<|endoftext|>",
        "   ```",
        "",
        "   `{modalities}` joins with \" and \" the parts the input has, in the order text, image, video, "
        "named `sentence`, `image`, `video` (\"sentence\", \"image\", \"video\", \"sentence and image\", "
        "\"sentence and video\"). An image is `<|vision_start|><|image_pad|><|vision_end|>`, a video "
        "`<|vision_start|><|video_pad|><|vision_end|>`, with the single pad expanded to one pad per merged "
        f"visual token (t*h*w/{v.merge_unit} of the pre-processor's grid). Fused inputs put the vision block "
        "where the text says (or before the text).",
        "2. Pad on the LEFT with `<|endoftext|>` (it is also the final token: pool by position, never by "
        "token id), and mask the padding in attention.",
        "3. Positions are plain sequential 0..L-1 over the whole padded row, pads included, the same index "
        "in all three M-RoPE sections (ordinary 1-D RoPE) - not Qwen2-VL's 3-D positions. In transformers "
        "this is calling `model.model.language_model` with `position_ids=None`.",
        "4. The embedding is the final hidden state (after the last RMSNorm) at the last position, "
        "L2-normalised.",
        "",
        "Images follow `preprocessor_config.json` (Qwen2-VL `smart_resize`, bicubic, CLIP normalisation). "
        "Videos are sampled at 1 fps (4 to 12 frames in training, 32 to 48 in evaluation, an even count) "
        "and every frame is pre-processed like an image; two frames form one temporal patch.",
        "",
        "## Usage with transformers (5.x)",
        "",
        "```python",
        TRANSFORMERS_SNIPPET.rstrip("\n"),
        "```",
        "",
        "## Usage with unite-jax",
        "",
        "```python",
        "from unite_jax import Embedder",
        "",
        f'embedder = Embedder.from_pretrained("{SNIPPET_PATH}")',
        'vectors = embedder.encode([{"text": "a dog catching a frisbee"}, {"image": "photo.jpg"},',
        '                           {"text": "<|IMAGE|>\\nWhat is the dog doing?", "image": "photo.jpg"}])',
        "```",
        "",
        "## Provenance",
        "",
        f"- source: {meta.get('source') or 'unknown'}",
        f"- model directory created: {meta.get('created', 'unknown')}",
        f"- exported: {exported}",
        f"- LoRA: {lora_line}",
    ]
    if extra:
        lines += ["- metadata:", "", "```json", json.dumps(extra, indent=2, sort_keys=True, default=str), "```"]
    return "\n".join(lines) + "\n"


def snippet_from_card(card: str) -> str:
    """The first ```python block of a model card (the transformers usage)."""
    start = card.index("```python\n") + len("```python\n")
    return card[start:card.index("```", start)]
