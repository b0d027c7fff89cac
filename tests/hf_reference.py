"""Tiny random Qwen2-VL models in transformers (PyTorch), the independent reference of the tests.

Two variants differ in every axis a port can get wrong: head counts, GQA ratio,
head dim (and so the M-RoPE sections), vision width, tied vs untied embeddings.
All parameters, biases and norm weights included, are randomised so a swapped
or untransposed tensor cannot go unnoticed.
"""

from __future__ import annotations

import os

import numpy as np

from unite_jax.data import tiny_tokenizer

VARIANTS = {
    # name: (text hidden, heads, kv heads, layers, intermediate, mrope, tied, vision embed, vision heads, depth)
    "gqa2_tied": dict(hidden=64, heads=4, kv=2, layers=2, inter=112, mrope=[2, 3, 3], tied=True,
                      v_embed=32, v_heads=2, v_depth=2),
    "gqa4_untied": dict(hidden=96, heads=4, kv=1, layers=3, inter=160, mrope=[4, 4, 4], tied=False,
                        v_embed=48, v_heads=3, v_depth=3),
}


def hf_config(variant: str):
    from transformers import Qwen2VLConfig

    v = VARIANTS[variant]
    ids = tiny_tokenizer.SPECIAL_TOKEN_IDS
    text = dict(
        vocab_size=tiny_tokenizer.VOCAB_SIZE, hidden_size=v["hidden"], intermediate_size=v["inter"],
        num_hidden_layers=v["layers"], num_attention_heads=v["heads"], num_key_value_heads=v["kv"],
        rms_norm_eps=1e-6, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": v["mrope"]},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=v["tied"],
    )
    vision = dict(depth=v["v_depth"], embed_dim=v["v_embed"], hidden_size=v["hidden"], num_heads=v["v_heads"],
                  mlp_ratio=2, patch_size=14, temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
    return Qwen2VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=v["tied"],
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )


def hf_model(variant: str, seed: int = 0):
    """A float32 eager-attention Qwen2VLForConditionalGeneration with every tensor randomised."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration._from_config(
        hf_config(variant), attn_implementation="eager", dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q.weight" in name \
                    or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.05 * noise)
            else:
                fan_in = p.shape[-1] if p.ndim > 1 else p.shape[0]
                p.copy_(noise / np.sqrt(fan_in))
    model.eval()
    return model


IMAGE_PROCESSOR = dict(min_pixels=8 * 28 * 28, max_pixels=64 * 28 * 28)


def save_hf_dir(model, directory: str, tokenizer_dir: str | None = None) -> str:
    """Writes model + tiny tokenizer + image processor config, as a user's checkpoint directory looks."""
    from transformers import Qwen2VLImageProcessorPil

    model.save_pretrained(directory)
    if tokenizer_dir is None:
        tiny_tokenizer.build(directory)
    else:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            with open(os.path.join(tokenizer_dir, name), "rb") as src, open(os.path.join(directory, name), "wb") as dst:
                dst.write(src.read())
    Qwen2VLImageProcessorPil(**IMAGE_PROCESSOR).save_pretrained(directory)
    return directory


def reference_embeddings(model, model_dir, items):
    """UNITE embeddings of `items` computed with transformers (float32), the Embedder's reference.

    items: specs {"content": text with <IMG> / <VID> where media go, "images": [PIL images],
    "videos": [frame lists], "modalities": "sentence" | "image" | ...}. Image pixels come from
    transformers' Qwen2VLImageProcessorPil; video pixels from our pre-processing (checked against an
    explicit-loop reference in test_media.py), since transformers' video processor needs torchvision.
    """
    import torch
    from helpers import PROMPT_HEAD, prompt_tail
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    from unite_jax.data import media

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    image_processor = Qwen2VLImageProcessorPil(**IMAGE_PROCESSOR)
    processor_cfg = media.ProcessorConfig.from_pretrained(model_dir)
    prompts, images, videos = [], [], []
    for spec in items:
        content = spec["content"]
        for image in spec.get("images", []):
            out = image_processor(images=[image], return_tensors="np")
            grid = out["image_grid_thw"][0]
            images.append((out["pixel_values"], grid))
            content = content.replace("<IMG>", "<|vision_start|>" + "<|image_pad|>" * (grid.prod() // 4)
                                      + "<|vision_end|>", 1)
        for frames in spec.get("videos", []):
            patches, grid = media.preprocess_video(frames, processor_cfg)
            videos.append((patches, grid))
            content = content.replace("<VID>", "<|vision_start|>" + "<|video_pad|>" * (grid.prod() // 4)
                                      + "<|vision_end|>", 1)
        prompts.append(PROMPT_HEAD + content + prompt_tail(spec["modalities"]))
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    seq = max(len(e) for e in encoded)
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    input_ids = torch.full((len(encoded), seq), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), seq), dtype=torch.long)
    for i, e in enumerate(encoded):
        input_ids[i, seq - len(e):] = torch.tensor(e)
        mask[i, seq - len(e):] = 1
    with torch.no_grad():
        embeds = model.model.language_model.embed_tokens(input_ids)
        for media_list, token_id in ((images, model.config.image_token_id), (videos, model.config.video_token_id)):
            if not media_list:
                continue
            pixels = torch.tensor(np.concatenate([m[0] for m in media_list]))
            grids = torch.tensor(np.stack([m[1] for m in media_list]))
            features = model.model.visual(pixels, grid_thw=grids).pooler_output
            slots = (input_ids == token_id).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(slots, features)
        hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                            position_ids=None).last_hidden_state[:, -1]
    return torch.nn.functional.normalize(hidden, dim=-1).numpy()
