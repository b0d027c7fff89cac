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
from helpers import photo, video_frames

from unite_jax import Embedder
from unite_jax.data import media

TOL = 1e-5


@pytest.mark.parametrize("variant", sorted(hf_reference.VARIANTS))
def test_embedder_matches_unite_reference_for_every_modality(variant, tmp_path):
    model = hf_reference.hf_model(variant, seed=2)
    model_dir = hf_reference.save_hf_dir(model, str(tmp_path / "model"))
    astronaut_path, astronaut = photo(tmp_path, "astronaut", np.s_[40:317, 60:451])
    chelsea_path, chelsea = photo(tmp_path, "chelsea", np.s_[:, :201])
    frames_a, frames_b = video_frames(0), video_frames(1, n=6, size=(84, 56))
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
    expected = hf_reference.reference_embeddings(model, model_dir, specs)
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
    frames = video_frames(3, n=30, size=(64, 96))
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
