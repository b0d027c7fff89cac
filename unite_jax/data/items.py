"""The input item: one schema for training manifests, encode / eval files and the Python API.

An item is a dict with any of
  text   str; may mark where media go with `<|IMAGE|>` / `<|VIDEO|>` placeholders (MMEB-style
         `<|image_N|>` markers mean `<|IMAGE|>` and are converted wherever an item is prepared);
  image  a path, PIL image or HxWx3 uint8 array, or a list of them;
  video  a path, a list of paths, a list of HxWx3 uint8 frames, or one [T, H, W, 3] uint8 array;
and optionally an `id` (ignored by the model). Files (manifests, JSONL items) give paths as a
string or a list of strings; empty strings and lists mean "absent".

An instruction goes in front of the text the same way everywhere (`join_instruction`): the
stripped instruction, a newline, the stripped text; the instruction alone when there is no text.
`prepare_item` turns an item into its tokenised prompt and pre-processed media: the one code path
of the trainer's pipeline, `Embedder.encode` and the evaluation.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from unite_jax import modality
from unite_jax.data import media
from unite_jax.data.packing import PackableInput
from unite_jax.data.prompts import IMAGE_PLACEHOLDER, has_text
from unite_jax.data.tokenize import PromptTokenizer

INPUT_KEYS = ("text", "image", "video")  # what the model reads
ITEM_KEYS = ("id",) + INPUT_KEYS
_MMEB_IMAGE_MARKER = re.compile(r"<\|image_\d+\|>")


def canonical_text(text: str | None) -> str | None:
    """The text with MMEB-style `<|image_N|>` markers replaced by `<|IMAGE|>`."""
    return _MMEB_IMAGE_MARKER.sub(IMAGE_PLACEHOLDER, text) if text else text


def join_instruction(instruction: str | None, text: str | None) -> str | None:
    """"INSTRUCTION\\nTEXT" (both stripped), the instruction alone without text, the text without instruction."""
    if instruction is None or not instruction.strip():
        return text
    text = (text or "").strip()
    return f"{instruction.strip()}\n{text}" if text else instruction.strip()


def with_instruction(item: dict, instruction: str | None) -> dict:
    """The item with `instruction` put in front of its text (`join_instruction`); the same item without one."""
    if instruction is None or not instruction.strip():
        return item
    return {**item, "text": join_instruction(instruction, item.get("text"))}


def model_inputs(item: dict) -> dict:
    """The keys of an item the model reads (drops id and any evaluation keys)."""
    return {key: item[key] for key in INPUT_KEYS if key in item}


def item_modality(item: dict) -> int:
    """Modality bits of what an item holds: text (besides placeholders), image, video."""
    video = item.get("video")
    has_video = video is not None and (not isinstance(video, list) or len(video) > 0)
    return ((modality.TEXT if has_text(canonical_text(item.get("text"))) else 0)
            | (modality.IMAGE if item.get("image") else 0)
            | (modality.VIDEO if has_video else 0))


def media_paths(value: Any, label: str) -> list[str]:
    """A media field read from a file (a path or a list of paths) -> its non-empty paths.

    None, "" and [] mean absent. Raises ValueError starting with `label` for any other type.
    """
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise ValueError(f"{label}: expected a path or a list of paths, got a list holding "
                             f"{sorted({type(v).__name__ for v in value})}")
        return [v for v in value if v.strip()]
    raise ValueError(f"{label}: expected a path or a list of paths, got {type(value).__name__}")


def resolve_path(path: str, root: str) -> str:
    """`path` if absolute, else joined to `root`; normalised."""
    return os.path.normpath(os.path.join(root, path))


def media_sources(source: Any, kind: str) -> list:
    """An item's image / video field as a list of media sources (one per image or video)."""
    if source is None:
        return []
    if kind == "video":
        # a list of paths is several videos; a list of frames (arrays / PIL images) is one video
        if isinstance(source, (list, tuple)) and source and all(isinstance(s, (str, os.PathLike)) for s in source):
            return list(source)
        return [source]
    if isinstance(source, (list, tuple)):
        return list(source)
    return [source]


def prepare_item(item: dict, index: int, tokenizer: PromptTokenizer, processor: media.ProcessorConfig,
                 max_text_tokens: int | None = 2048) -> PackableInput:
    """One item -> its tokenised prompt and pre-processed media; errors name the item index."""
    if not isinstance(item, dict):
        raise TypeError(f"item {index}: expected a dict with 'text', 'image' and/or 'video', "
                        f"got {type(item).__name__}")
    unknown = sorted(set(item) - set(ITEM_KEYS))
    if unknown:
        raise ValueError(f"item {index}: unknown key(s) {unknown}; allowed: {list(ITEM_KEYS)}")
    text = item.get("text")
    if text is not None and not isinstance(text, str):
        raise TypeError(f"item {index}: 'text' must be a string, got {type(text).__name__}")
    text = canonical_text(text)
    try:
        # Patches stay uint8 levels until pack_batch normalises them into the batch buffer.
        visions = [("image", *media.image_pixel_patches(src, processor))
                   for src in media_sources(item.get("image"), kind="image")]
        visions += [("video", *media.video_pixel_patches(src, processor))
                    for src in media_sources(item.get("video"), kind="video")]
    except (ValueError, TypeError, OSError) as e:  # MediaError is a ValueError
        raise with_item_index(e, index) from e
    if not visions and not (text and text.strip()):
        raise ValueError(f"item {index}: empty input (no text, image or video)")
    merge_unit = processor.merge_size**2
    kinds = [kind for kind, _, _ in visions]
    counts = [patches.shape[0] // merge_unit for _, patches, _ in visions]
    try:
        prompt = tokenizer.encode(text, counts, kinds, max_text_tokens=max_text_tokens)
    except ValueError as e:
        raise ValueError(f"item {index}: {e}") from e
    return PackableInput(prompt.input_ids, [p for _, p, _ in visions],
                         [tuple(int(g) for g in np.ravel(grid)) for _, _, grid in visions], prompt.vision_runs)


def with_item_index(error: Exception, index: int) -> Exception:
    """The same kind of error with the item index in front of its message."""
    message = f"item {index}: {error}"
    try:
        return type(error)(message)
    except TypeError:  # an exception class whose constructor needs more than a message
        return ValueError(message)
