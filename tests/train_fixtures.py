"""A small generated training set and config for the trainer tests (tiny preset, CPU)."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "brown": (120, 80, 30)}
SHAPES = ("square", "circle")
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _image(color, shape, number, size=56) -> Image.Image:
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
        _image(color, shape, i, 56).save(os.path.join(directory, name))
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
    """configs/stageN.py:tiny with small shapes for tests; overrides are dotted keys."""
    import importlib.util

    here = os.path.join(os.path.dirname(__file__), "..", "configs", f"{stage}.py")
    spec = importlib.util.spec_from_file_location(f"config_{stage}", here)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    config.data.train = manifest
    config.data.num_workers = 0
    config.data.seq_len = 96
    config.data.patches_per_row = 64
    config.data.vision_block = 64
    config.train.global_batch_size = 16
    config.train.steps = 6
    config.checkpoint.every_steps = 2
    config.checkpoint.async_save = False
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def config_flags(manifest: str, **overrides) -> list[str]:
    """The same settings as command-line flags for launch/train.py (tests that run it as a subprocess)."""
    base = {"data.train": manifest, "data.num_workers": 0, "data.seq_len": 96, "data.patches_per_row": 64,
            "data.vision_block": 64, "train.global_batch_size": 16, "train.steps": 6, "checkpoint.every_steps": 2,
            "checkpoint.async_save": False}
    base.update(overrides)
    return [f"--config.{k}={v}" for k, v in base.items()]
