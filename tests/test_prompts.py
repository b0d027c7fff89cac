"""UNITE prompt strings and their tokenisation (pads expanded in place, text-only truncation)."""

import numpy as np
import pytest
from helpers import PROMPT_HEAD as HEAD
from helpers import prompt_tail as tail

from unite_jax.data.prompts import build_prompt

IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"



@pytest.mark.parametrize("text,images,videos,expected,order", [
    ("  a cat on a mat \n", 0, 0, HEAD + "a cat on a mat" + tail("sentence"), []),
    (None, 1, 0, HEAD + IMG + tail("image"), ["image"]),
    (None, 0, 1, HEAD + VID + tail("video"), ["video"]),
    ("<|IMAGE|>\nFind a similar photo.", 1, 0, HEAD + IMG + "\nFind a similar photo." + tail("sentence and image"),
     ["image"]),
    ("Next: <|VIDEO|> then?", 0, 1, HEAD + "Next: " + VID + " then?" + tail("sentence and video"), ["video"]),
    ("a dog", 1, 0, HEAD + IMG + "a dog" + tail("sentence and image"), ["image"]),
    ("<|VIDEO|> vs <|IMAGE|>", 1, 1, HEAD + VID + " vs " + IMG + tail("sentence and image and video"),
     ["video", "image"]),
    ("<|IMAGE|>", 1, 0, HEAD + IMG + tail("image"), ["image"]),
])
def test_prompt_strings(text, images, videos, expected, order):
    prompt, media_order = build_prompt(text, images, videos)
    assert prompt == expected
    assert media_order == order


def test_prompt_errors():
    with pytest.raises(ValueError, match="at least one of text, image or video"):
        build_prompt("   ", 0, 0)
    with pytest.raises(ValueError, match=r"1 <\|VIDEO\|> placeholder\(s\) but the input has 0 video"):
        build_prompt("<|VIDEO|> <|IMAGE|>", 1, 0)


def test_token_ids_equal_transformers_tokenizer_on_expanded_prompt(tokenizer, hf_tokenizer):
    ours, theirs = tokenizer, hf_tokenizer
    text = "<|VIDEO|> a red circle.\n<|IMAGE|> what next?"
    got = ours.encode(text, merged_token_counts=[6, 10], media_kinds=["image", "video"])
    prompt = (HEAD + "<|vision_start|>" + "<|video_pad|>" * 10 + "<|vision_end|> a red circle.\n<|vision_start|>"
              + "<|image_pad|>" * 6 + "<|vision_end|> what next?" + tail("sentence and image and video"))
    expected = theirs(prompt, add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(got.input_ids, expected)
    assert got.media_order == ["video", "image"]
    # runs are indexed by the given media order (image first), pointing at their own pads
    (img_start, img_len), (vid_start, vid_len) = got.vision_runs
    assert (img_len, vid_len) == (6, 10)
    assert set(got.input_ids[img_start:img_start + 6]) == {ours.image_pad_id}
    assert set(got.input_ids[vid_start:vid_start + 10]) == {ours.video_pad_id}
    assert got.input_ids[-1] == ours.pad_id  # every prompt ends with <|endoftext|>


def test_truncation_cuts_text_only(tokenizer):
    ours = tokenizer
    long_text = "<|IMAGE|> " + "the quick brown fox jumps over the lazy dog " * 20
    full = ours.encode(long_text, [4], ["image"])
    cut = ours.encode(long_text, [4], ["image"], max_text_tokens=12)
    assert cut.truncated and not full.truncated
    assert len(cut.input_ids) < len(full.input_ids)
    # the vision block and the template tail survive intact
    assert (cut.input_ids == ours.image_pad_id).sum() == 4
    tail_ids = ours._encode(tail("sentence and image"))
    np.testing.assert_array_equal(cut.input_ids[-len(tail_ids):], tail_ids)
    text_ids = ours._encode("the quick brown fox jumps over the lazy dog " * 20)
    assert len(full.input_ids) - len(cut.input_ids) >= len(text_ids) - 12 - 2


def test_mismatched_tokenizer_is_rejected(tokenizer):
    ours = tokenizer
    with pytest.raises(ValueError, match="tokenizer and model do not match"):
        ours.check_model_ids(151655, 151656)
