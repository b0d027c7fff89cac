"""Tokenising UNITE prompts: the whole prompt at once, then each vision pad expanded in place.

The prompt is tokenised as one string (exactly as the reference processor
does; tokenising pieces separately changes merges at their borders), with a
single `<|image_pad|>` / `<|video_pad|>` per vision block. Pad tokens are
special tokens, so expanding them after tokenisation gives the same ids as
expanding them in the string.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

from unite_jax.data.prompts import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, build_prompt

REQUIRED_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                   "<|image_pad|>", "<|video_pad|>")
# The tokenizer files a model directory carries (transformers' names); tokenizer.json is the one read here.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "chat_template.json", "chat_template.jinja")


@dataclasses.dataclass
class TokenizedPrompt:
    """input_ids [seq] int32 with pads expanded; vision_runs[k] = (start, length) of the k-th media's pad run."""

    input_ids: np.ndarray
    media_order: list[str]
    vision_runs: list[tuple[int, int]]
    truncated: bool = False


class PromptTokenizer:
    """Wraps a `tokenizers.Tokenizer` (the model directory's tokenizer.json) for UNITE prompts."""

    def __init__(self, tokenizer, source: str = "<tokenizer>"):
        self.tokenizer = tokenizer
        self.source = source
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        missing = [t for t in REQUIRED_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"{source}: tokenizer lacks the Qwen2-VL special tokens {missing}")
        self.token_ids = {t: vocab[t] for t in REQUIRED_TOKENS}
        self.pad_id = self.token_ids["<|endoftext|>"]
        self.image_pad_id = self.token_ids["<|image_pad|>"]
        self.video_pad_id = self.token_ids["<|video_pad|>"]

    @classmethod
    def from_pretrained(cls, model_dir: str) -> "PromptTokenizer":
        from tokenizers import Tokenizer

        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{model_dir}: no tokenizer.json (a model directory needs its tokenizer)")
        try:
            tokenizer = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{path}: cannot load tokenizer ({e})") from e
        return cls(tokenizer, source=path)

    def check_model_ids(self, image_token_id: int, video_token_id: int) -> None:
        """Raises when the tokenizer's pad ids disagree with the model config (a mismatched tokenizer)."""
        if (self.image_pad_id, self.video_pad_id) != (image_token_id, video_token_id):
            raise ValueError(
                f"{self.source}: <|image_pad|>/<|video_pad|> ids are {self.image_pad_id}/{self.video_pad_id} but "
                f"the model config expects {image_token_id}/{video_token_id}: tokenizer and model do not match")

    def check_vocab_size(self, vocab_size: int) -> None:
        """Raises when a token id would be past the model's embedding rows (a tokenizer of another model)."""
        size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        if size > vocab_size:
            raise ValueError(f"{self.source}: the tokenizer has {size} tokens but the model's embedding has "
                             f"{vocab_size} rows (config vocab_size): tokenizer and model do not match")

    def _encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def truncate_text(self, text: str, max_tokens: int) -> tuple[str, bool]:
        """Cuts `text` to at most `max_tokens` tokens, from the end, never through a placeholder.

        Placeholders are kept whole and not counted; text pieces between them are
        shortened starting with the last one.
        """
        pieces = re.split(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})", text)
        is_text = [p not in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER) for p in pieces]
        encoded = [self._encode(p) if t else None for p, t in zip(pieces, is_text)]
        excess = sum(len(e) for e in encoded if e is not None) - max_tokens
        if excess <= 0:
            return text, False
        for i in reversed(range(len(pieces))):
            if excess <= 0:
                break
            if not is_text[i] or not len(encoded[i]):
                continue
            keep = max(len(encoded[i]) - excess, 0)
            excess -= len(encoded[i]) - keep
            pieces[i] = self.tokenizer.decode(encoded[i][:keep].tolist(), skip_special_tokens=False)
        return "".join(pieces), True

    def encode(self, text: str | None, merged_token_counts: list[int], media_kinds: list[str] | None = None,
               max_text_tokens: int | None = None) -> TokenizedPrompt:
        """Tokenises the UNITE prompt of one input.

        text: the raw text (may hold <|IMAGE|>/<|VIDEO|> placeholders) or None.
        merged_token_counts: merged visual tokens of each media, in the order images then videos
            (the order the media are given); `media_kinds` names them ("image"/"video").
        max_text_tokens: cap on the user text only; vision blocks and the template are never cut.
        """
        media_kinds = media_kinds or []
        num_images, num_videos = media_kinds.count("image"), media_kinds.count("video")
        truncated = False
        if text and max_text_tokens is not None:
            text, truncated = self.truncate_text(text, max_text_tokens)
        prompt, order = build_prompt(text, num_images, num_videos)
        ids = self._encode(prompt)
        # Media are given images-first; the prompt may interleave them: map prompt order -> given index.
        given = {"image": [i for i, k in enumerate(media_kinds) if k == "image"],
                 "video": [i for i, k in enumerate(media_kinds) if k == "video"]}
        taken = {"image": 0, "video": 0}
        pieces, runs, cursor, out_len = [], [], 0, 0
        pad_positions = np.flatnonzero((ids == self.image_pad_id) | (ids == self.video_pad_id))
        if len(pad_positions) != len(order):
            raise ValueError(f"prompt holds {len(pad_positions)} vision pads, expected {len(order)}: "
                             "the text must not contain raw <|image_pad|>/<|video_pad|> tokens")
        for pos, kind in zip(pad_positions, order):
            index = given[kind][taken[kind]]
            taken[kind] += 1
            count = merged_token_counts[index]
            pieces.append(ids[cursor:pos])
            out_len += pos - cursor
            runs.append((index, out_len, count))
            pieces.append(np.full(count, ids[pos], np.int32))
            out_len += count
            cursor = pos + 1
        pieces.append(ids[cursor:])
        # vision_runs indexed by the given media order, so callers pair them with their patches.
        vision_runs = [None] * len(media_kinds)
        for index, start, count in runs:
            vision_runs[index] = (start, count)
        return TokenizedPrompt(np.concatenate(pieces).astype(np.int32), order, vision_runs, truncated)
