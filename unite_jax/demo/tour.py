"""A one-minute tour of the encoding API: encode text, images, a video and fused inputs with a tiny random UNITE model.

    python launch/demo_encode.py --workdir=demo_out

Writes a random `tiny` model to WORKDIR/model (Hugging Face format), encodes a
few generated examples with `Embedder`, and prints the query x candidate
similarity matrix. The weights are random, so the scores only show that every
modality flows through the same model into one vector space.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from unite_jax.api import Embedder
from unite_jax.demo.random_model import write_random_model


def shape_image(shape: str, color: str, size=(224, 168)) -> Image.Image:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    box = (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=color)
    return image


def moving_square(direction: int, frames: int = 8, size=(112, 112)) -> list[np.ndarray]:
    out = []
    for t in range(frames):
        frame = np.full((*size, 3), 255, np.uint8)
        x = 8 + t * 10 if direction > 0 else size[1] - 40 - t * 10
        frame[40:72, x:x + 32] = (30, 30, 200)
        out.append(frame)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="demo_out")
    args = parser.parse_args(argv)
    model_dir = write_random_model(os.path.join(args.workdir, "model"))
    embedder = Embedder.from_pretrained(model_dir)
    queries = [
        {"text": "a red circle"},
        {"text": "a square moving to the right"},
        {"text": "<|IMAGE|> the same shape in blue", "image": shape_image("circle", "red")},
    ]
    candidates = [
        {"image": shape_image("circle", "red")},
        {"image": shape_image("square", "green")},
        {"video": moving_square(+1)},
        {"text": "a blue circle", "image": shape_image("circle", "blue")},
    ]
    q = embedder.encode(queries, batch_size=4)
    c = embedder.encode(candidates, batch_size=4)
    print(f"model: {model_dir}  embedding dim: {q.shape[1]}  devices: {len(embedder.mesh.devices.ravel())}")
    print("cosine similarity (rows: queries, columns: candidates)")
    for query, row in zip(queries, q @ c.T):
        print(f"  {query.get('text', '')[:34]:<34} " + " ".join(f"{s:+.3f}" for s in row))
    norms = np.linalg.norm(np.concatenate([q, c]), axis=1)
    print(f"all vectors unit length: {bool(np.allclose(norms, 1.0, atol=1e-5))}")
