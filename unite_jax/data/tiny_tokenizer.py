"""A tiny byte-level BPE tokenizer with Qwen2-VL's special tokens, and the `tiny` preset's assets.

Used by the `tiny` model preset, the demo and the tests, where the real Qwen2
tokenizer (151k tokens, downloaded from the hub) is not available. Training is
deterministic: the same corpus and settings always give the same vocabulary.
`write_assets` adds the tiny preset's small pixel budget, so a CPU trains on images in seconds.
"""

from __future__ import annotations

import json
import os

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Special tokens come first in the trainer's list, so their ids are their positions.
SPECIAL_TOKEN_IDS = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
VOCAB_SIZE = 512
# The tiny preset's pixel budget: small enough that a CPU trains on and encodes images in milliseconds.
TINY_MIN_PIXELS = 16 * 28 * 28
TINY_MAX_PIXELS = 256 * 28 * 28

_CORPUS = """
system You are a helpful assistant. user assistant
Summary above sentence in one word: Summary above image in one word:
Summary above video in one word: Summary above sentence and image in one word:
Summary above sentence and video in one word:
a photo of a cat sitting on a red sofa near the window. A dog runs across the green park.
the digit zero one two three four five six seven eight nine moves left right up down.
Find an image that matches the given caption. Represent the given video for retrieval.
Retrieve the video that shows what happens next. What is in the picture? Answer the question.
astronaut coffee rocket camera coins horse chelsea brick grass moon text page clock
The quick brown fox jumps over the lazy dog while people walk in the city at night.
"""


def build(directory: str) -> str:
    """Trains the tokenizer and writes `tokenizer.json` and `tokenizer_config.json` into `directory`.

    Returns the path of `tokenizer.json`. The files load with `tokenizers.Tokenizer.from_file`
    and with `transformers.AutoTokenizer.from_pretrained(directory)`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([line for line in _CORPUS.splitlines() if line.strip()], trainer=trainer)
    if tokenizer.get_vocab_size() > VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer grew to {tokenizer.get_vocab_size()} > {VOCAB_SIZE} tokens")
    for token, index in SPECIAL_TOKEN_IDS.items():
        if tokenizer.token_to_id(token) != index:
            raise RuntimeError(f"tiny tokenizer: {token} got id {tokenizer.token_to_id(token)}, expected {index}")

    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tokenizer.json")
    tokenizer.save(path)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 32768,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "padding_side": "left",
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return path


def write_assets(directory: str) -> str:
    """The `tiny` preset's tokenizer and pre-processor files (`build`, and the tiny pixel budget); returns
    `directory`."""
    from unite_jax.data import media

    build(directory)
    media.ProcessorConfig(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS).save_pretrained(directory)
    return directory
