"""``make demo``: build the tiny composed model, encode generated images and captions, print similarities.

Runs offline in seconds. The weights are random, so the matrix shows the mechanics (shapes,
normalization, instruction and image conditioning), not quality.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

import mmembed

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220)}
SHAPES = ("circle", "square")


def render(color: str, shape: str, size: int = 64) -> Image.Image:
    img = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
    return img


def main() -> None:
    torch.manual_seed(0)
    model = mmembed.build_model("recipes/tiny/composed.yaml")
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    images = [render(c, s) for c, s in pairs]
    captions = [f"a {c} {s}" for c, s in pairs]
    img_emb = model.encode(images=images, instruction="Represent the given image.")
    txt_emb = model.encode(texts=captions, instruction="Find an image that matches the caption:")
    sim = model.similarity(img_emb, txt_emb)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, embeddings {img_emb.shape}")
    print("cosine similarity, images (rows) x captions (columns); random init, so no meaning yet:\n")
    width = max(len(c) for c in captions) + 2
    print(" " * width + "".join(f"{c:>{width}}" for c in captions))
    for cap, row in zip(captions, sim):
        print(f"{'[' + cap + ']':<{width}}" + "".join(f"{v:>{width}.3f}" for v in row))
    hit = float(np.mean(sim.argmax(axis=1) == np.arange(len(pairs))))
    print(f"\nimage->caption hit@1 {hit:.2f} (chance {1 / len(pairs):.2f}); train it with `mmembed train`.")


if __name__ == "__main__":
    main()
