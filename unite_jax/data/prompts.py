"""UNITE prompts: every input becomes a one-word summary request in the Qwen chat template.

    <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{content}
    \nSummary above {modalities} in one word:<|im_end|>\n<|im_start|>assistant\n<|endoftext|>

`{content}` is the stripped text with each `<|IMAGE|>` / `<|VIDEO|>` placeholder
replaced by a vision block. When the text has no placeholders, the vision
blocks (images, then videos) are put in front of it, as Qwen2-VL's chat
template does.
"""

from __future__ import annotations

IMAGE_PLACEHOLDER = "<|IMAGE|>"
VIDEO_PLACEHOLDER = "<|VIDEO|>"
IMAGE_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_BLOCK = "<|vision_start|><|video_pad|><|vision_end|>"
PROMPT_HEAD = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
PROMPT_TAIL = "\nSummary above {modalities} in one word:<|im_end|>\n<|im_start|>assistant\n<|endoftext|>"
_BLOCKS = {"image": IMAGE_BLOCK, "video": VIDEO_BLOCK}
_PLACEHOLDERS = {"image": IMAGE_PLACEHOLDER, "video": VIDEO_PLACEHOLDER}


def has_text(text: str | None) -> bool:
    """True when the text has content besides vision placeholders (the prompt's 'sentence')."""
    return bool(text and text.replace(IMAGE_PLACEHOLDER, "").replace(VIDEO_PLACEHOLDER, "").strip())


def modalities_phrase(with_text: bool, num_images: int, num_videos: int) -> str:
    """'sentence', 'image', 'video', 'sentence and image', ... in the order text, image, video."""
    names = [name for name, present in (("sentence", with_text), ("image", num_images > 0),
                                         ("video", num_videos > 0)) if present]
    if not names:
        raise ValueError("an input needs at least one of text, image or video")
    return " and ".join(names)


def build_content(text: str | None, num_images: int, num_videos: int) -> tuple[str, list[str]]:
    """The user content with vision blocks in place, and the media kinds in prompt order.

    Returns (content, media_order) where media_order lists "image"/"video" as
    they appear in the content, which is the order their visual tokens fill the
    pad slots.
    """
    text = (text or "").strip()
    counts = {"image": num_images, "video": num_videos}
    placed = {kind: text.count(_PLACEHOLDERS[kind]) for kind in counts}
    if any(placed.values()):
        for kind in counts:
            if placed[kind] != counts[kind]:
                raise ValueError(f"the text has {placed[kind]} {_PLACEHOLDERS[kind]} placeholder(s) "
                                 f"but the input has {counts[kind]} {kind}(s)")
        order = _placeholder_order(text)
        for kind in counts:
            text = text.replace(_PLACEHOLDERS[kind], _BLOCKS[kind])
        return text, order
    order = ["image"] * num_images + ["video"] * num_videos
    return "".join(_BLOCKS[kind] for kind in order) + text, order


def _placeholder_order(text: str) -> list[str]:
    order, start = [], 0
    while True:
        hits = [(text.find(_PLACEHOLDERS[k], start), k) for k in _PLACEHOLDERS]
        hits = [(pos, k) for pos, k in hits if pos >= 0]
        if not hits:
            return order
        pos, kind = min(hits)
        order.append(kind)
        start = pos + len(_PLACEHOLDERS[kind])


def build_prompt(text: str | None, num_images: int = 0, num_videos: int = 0) -> tuple[str, list[str]]:
    """Full UNITE prompt (one pad token per vision block) and the media kinds in order."""
    content, order = build_content(text, num_images, num_videos)
    tail = PROMPT_TAIL.format(modalities=modalities_phrase(has_text(text), num_images, num_videos))
    return PROMPT_HEAD + content + tail, order
