"""What several test files share: tree comparisons, file writers, test media, random LoRA, the tiny training setup.

References stay independent of the code under test: the prompt strings are spelled out here rather than
imported from the library, and tree comparisons look at raw bytes (bfloat16, NaN and -0.0 included).
"""

from __future__ import annotations

import importlib.util
import json
import os

import chex
import jax
import numpy as np
from PIL import Image

# ---------------------------------------------------------------------------------------- prompts
PROMPT_HEAD = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"


def prompt_tail(modalities: str) -> str:
    """The end of a UNITE prompt: `modalities` is "sentence", "image", "sentence and image", ..."""
    return f"\nSummary above {modalities} in one word:<|im_end|>\n<|im_start|>assistant\n<|endoftext|>"


# ---------------------------------------------------------------------------------------- trees
def flatten(tree, prefix: str = "") -> dict:
    """{"a/b/c": leaf} of a nested dict."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        out.update(flatten(value, path) if isinstance(value, dict) else {path: value})
    return out


def raw_bytes(array) -> np.ndarray:
    """The array's bytes in C order, so bit-exact comparison also works for bfloat16, NaNs and -0.0."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def assert_trees_bit_equal(actual, expected) -> None:
    """The same tree structure (chex), and per leaf the same dtype, shape and bytes."""
    actual = jax.tree.map(np.asarray, actual)
    expected = jax.tree.map(np.asarray, expected)
    chex.assert_trees_all_equal_structs(actual, expected)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected)):
        where = jax.tree_util.keystr(path)
        assert x.dtype == y.dtype and x.shape == y.shape, (where, x.dtype, x.shape, y.dtype, y.shape)
        assert np.array_equal(raw_bytes(x), raw_bytes(y)), where


def assert_trees_close(actual, expected, atol: float, rtol: float = 0.0) -> None:
    """The same tree structure and |actual - expected| <= atol + rtol * |expected| leaf by leaf (in float32)."""
    as_float = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float32), tree)
    chex.assert_trees_all_close(as_float(actual), as_float(expected), atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------- files and media
def write_jsonl(path, records) -> str:
    """One JSON object per line (strings are written as given); returns the path as a string."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    return str(path)


def write_video(path, frames: np.ndarray, fps: int, codec: str = "libx264", options: dict | None = None) -> str:
    """uint8 [T, H, W, 3] frames as a video file (PyAV); ffv1 keeps 4:4:4 chroma, the others 4:2:0."""
    import av

    assert codec in av.codecs_available, f"PyAV build lacks the {codec} encoder"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv444p" if codec == "ffv1" else "yuv420p"
        stream.options = options or {}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def photo(tmp_path, name: str, crop) -> tuple[str, Image.Image]:
    """A crop of a scikit-image sample photo saved as PNG: (path, PIL image)."""
    from skimage import data as skdata

    image = Image.fromarray(getattr(skdata, name)()[crop])
    path = tmp_path / f"{name}.png"
    image.save(path)
    return str(path), image


def video_frames(seed: int, n: int = 4, size=(60, 90)) -> list[np.ndarray]:
    """n noisy uint8 frames of the coffee photo's corner."""
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    base = skdata.coffee()[: size[0], : size[1]].astype(np.int16)
    return [np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8) for _ in range(n)]


# ---------------------------------------------------------------------------------------- LoRA
def random_lora(params, targets, rank: int, seed: int, dtype=np.float32, scale: float = 0.3) -> dict:
    """A LoRA tree for `targets` ((module, name) pairs of model/layers) with A and B ~ normal(0, scale)."""
    rng = np.random.default_rng(seed)
    layers = params["model"]["layers"]
    tree = {}
    for module, name in targets:
        num, fan_in, fan_out = np.shape(layers[module][name]["kernel"])
        tree.setdefault(module, {})[name] = {
            "lora_a": (rng.standard_normal((num, fan_in, rank)) * scale).astype(dtype),
            "lora_b": (rng.standard_normal((num, rank, fan_out)) * scale).astype(dtype)}
    return {"model": {"layers": tree}}


# ---------------------------------------------------------------------------------------- the tiny trainer
COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "brown": (120, 80, 30)}
SHAPES = ("square", "circle")
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# The one set of small shapes the trainer tests run with, on top of configs/stageN.py:tiny.
TINY_OVERRIDES = {"data.num_workers": 0, "data.seq_len": 96, "data.patches_per_row": 64, "data.vision_block": 64,
                  "train.global_batch_size": 16, "train.steps": 6, "checkpoint.every_steps": 2,
                  "checkpoint.async_save": False}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shape_image(color, shape, number, size=56) -> Image.Image:
    canvas = np.full((size, size, 3), 245, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    c = size // 2 + (number % 3 - 1) * 6
    if shape == "square":
        inside = (abs(yy - c) < 14) & (abs(xx - size // 2) < 14)
    else:
        inside = (yy - c) ** 2 + (xx - size // 2) ** 2 < 15 ** 2
    canvas[inside] = COLORS[color]
    return Image.fromarray(canvas)


def write_manifest(directory: str, num_pairs: int = 48) -> str:
    """A UNITE JSON-array manifest of image<->caption and text<->text pairs; returns its path."""
    os.makedirs(os.path.join(directory, "media"), exist_ok=True)
    records = []
    for i in range(num_pairs):
        color = list(COLORS)[i % len(COLORS)]
        shape = SHAPES[(i // len(COLORS)) % len(SHAPES)]
        word = WORDS[i % len(WORDS)]
        name = f"media/{i:03d}.png"
        _shape_image(color, shape, i, 56).save(os.path.join(directory, name))
        caption = f"a {color} {shape} for {word}"
        if i % 3 == 0:
            records.append({"query": {"text": caption}, "candidate": {"image": name}})
        elif i % 3 == 1:
            records.append({"query": {"image": name}, "candidate": {"text": caption}, "target_modal": "text"})
        else:
            other = WORDS[(i + 3) % len(WORDS)]
            records.append({"query": {"text": f"the {word}"}, "candidate": {"text": f"{word} {color}"},
                            "negative": {"text": f"{other} {color}"}})
    path = os.path.join(directory, "train.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def tiny_config(stage: str, manifest: str, **overrides):
    """configs/stageN.py:tiny with TINY_OVERRIDES (and `overrides`, dotted keys) for tests."""
    spec = importlib.util.spec_from_file_location(f"config_{stage}", os.path.join(ROOT, "configs", f"{stage}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    for key, value in {**TINY_OVERRIDES, "data.train": manifest, **overrides}.items():
        node = config
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def config_flags(manifest: str, **overrides) -> list[str]:
    """The same settings as command-line flags for launch/train.py (tests that run it as a subprocess)."""
    return [f"--config.{k}={v}" for k, v in {**TINY_OVERRIDES, "data.train": manifest, **overrides}.items()]
