"""`Embedder` end to end vs the UNITE recipe run on transformers (PyTorch, float32).

The reference follows UNITE.md: the prompt string written out literally, pads
expanded, tokenised by transformers' tokenizer, left padding, vision features
scattered into the pad slots, the language model with sequential positions,
last position, L2 normalisation. Image pixels come from transformers'
Qwen2VLImageProcessorPil; video pixels from our pre-processing (checked
against an explicit-loop reference in test_media.py), since transformers' video
processor needs torchvision.
"""

import hf_reference
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

from unite_jax import Embedder
from unite_jax.data import media

TOL = 1e-5
HEAD = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
TAIL = "\nSummary above {} in one word:<|im_end|>\n<|im_start|>assistant\n<|endoftext|>"


def _photo(tmp_path, name, crop):
    image = Image.fromarray(getattr(skdata, name)()[crop])
    path = tmp_path / f"{name}.png"
    image.save(path)
    return str(path), image


def _video_frames(seed, n=4, size=(60, 90)):
    rng = np.random.default_rng(seed)
    base = skdata.coffee()[: size[0], : size[1]].astype(np.int16)
    return [np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8) for _ in range(n)]


def _reference(model, model_dir, items):
    """UNITE embeddings of `items` (specs with reference-side media) computed with transformers."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    image_processor = Qwen2VLImageProcessorPil(**hf_reference.IMAGE_PROCESSOR)
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
        prompts.append(HEAD + content + TAIL.format(spec["modalities"]))
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


@pytest.mark.parametrize("variant", sorted(hf_reference.VARIANTS))
def test_embedder_matches_unite_reference_for_every_modality(variant, tmp_path):
    model = hf_reference.hf_model(variant, seed=2)
    model_dir = hf_reference.save_hf_dir(model, str(tmp_path / "model"))
    astronaut_path, astronaut = _photo(tmp_path, "astronaut", np.s_[40:317, 60:451])
    chelsea_path, chelsea = _photo(tmp_path, "chelsea", np.s_[:, :201])
    frames_a, frames_b = _video_frames(0), _video_frames(1, n=6, size=(84, 56))
    items = [
        {"text": "  a photo of a cat sitting on a red sofa  "},
        {"image": astronaut_path},
        {"video": frames_a},
        {"text": "<|IMAGE|>\nWhat is in the picture? Answer the question.", "image": chelsea_path},
        {"text": "Retrieve the video that shows what happens next. <|VIDEO|>", "video": frames_b},
        {"text": "the digit seven moves left", "image": astronaut},  # fused, no placeholder
    ]
    specs = [
        {"content": "a photo of a cat sitting on a red sofa", "modalities": "sentence"},
        {"content": "<IMG>", "images": [astronaut], "modalities": "image"},
        {"content": "<VID>", "videos": [frames_a], "modalities": "video"},
        {"content": "<IMG>\nWhat is in the picture? Answer the question.", "images": [chelsea],
         "modalities": "sentence and image"},
        {"content": "Retrieve the video that shows what happens next. <VID>", "videos": [frames_b],
         "modalities": "sentence and video"},
        {"content": "<IMG>the digit seven moves left", "images": [astronaut], "modalities": "sentence and image"},
    ]
    expected = _reference(model, model_dir, specs)
    embedder = Embedder.from_pretrained(model_dir)
    got = embedder.encode(items, batch_size=4)
    assert got.dtype == np.float32 and got.shape == (len(items), model.config.text_config.hidden_size)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
    # batch composition and order do not change an item's vector
    again = embedder.encode(items[::-1], batch_size=3)[::-1]
    np.testing.assert_allclose(again, got, atol=TOL, rtol=0)


def test_embedder_bad_input_names_the_item(tmp_path):
    model = hf_reference.hf_model("gqa2_tied")
    model_dir = hf_reference.save_hf_dir(model, str(tmp_path / "model"))
    embedder = Embedder.from_pretrained(model_dir)
    with pytest.raises(ValueError, match=r"item 1: unknown key\(s\) \['caption'\]"):
        embedder.encode([{"text": "ok"}, {"caption": "x"}])
    with pytest.raises(ValueError, match=r"item 0: .*missing\.jpg"):
        embedder.encode([{"image": str(tmp_path / "missing.jpg")}])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(ValueError, match=r"item 2: .*broken\.png"):
        embedder.encode([{"text": "a"}, {"text": "b"}, {"image": str(broken)}])
    with pytest.raises(ValueError, match="item 0: empty input"):
        embedder.encode([{"text": "   "}])
    with pytest.raises(ValueError, match=r"item 0: the text has 2 <\|IMAGE\|> placeholder"):
        embedder.encode([{"text": "<|IMAGE|> and <|IMAGE|>", "image": np.zeros((56, 56, 3), np.uint8)}])


def test_from_pretrained_rejects_incomplete_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Embedder.from_pretrained(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Embedder.from_pretrained(str(empty))
    model_dir = hf_reference.save_hf_dir(hf_reference.hf_model("gqa2_tied"), str(tmp_path / "m"))
    (tmp_path / "m" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Embedder.from_pretrained(model_dir)


def test_video_file_encodes_like_its_sampled_frames(tmp_path):
    """A video path goes through PyAV sampling (1 fps, even count) and then the frame path."""
    import av

    model_dir = hf_reference.save_hf_dir(hf_reference.hf_model("gqa2_tied"), str(tmp_path / "m"))
    path = str(tmp_path / "clip.mp4")
    frames = _video_frames(3, n=30, size=(64, 96))
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    embedder = Embedder.from_pretrained(model_dir)
    sampled = media.load_video(path, embedder.processor)
    assert len(sampled) == 6  # 6 s at 1 fps, within [4, 12], even
    got = embedder.encode([{"video": path, "text": "a clip"}, {"video": sampled, "text": "a clip"}])
    np.testing.assert_allclose(got[0], got[1], atol=1e-6)
