"""Helpers of the component tests: tiny models from the tiny recipe with overrides, mixed input rows."""

from __future__ import annotations

import torch

import mmembed
from tests.conftest import TINY_RECIPE, make_image


def build(*overrides: str, seed: int = 0):
    """The tiny composed model with ``key=value`` overrides, in eval mode."""
    torch.manual_seed(seed)
    return mmembed.build_model(TINY_RECIPE, list(overrides)).eval()


def rows():
    """Mixed rows (text-only, image-only, both, two images) for invariance checks."""
    imgs = [make_image(i, size=(40 + 4 * i, 48)) for i in range(5)]
    texts = ["a red circle on the left", None, "what color is the object?", "x", "a blue square at the top"]
    images = [None, imgs[1], imgs[2], [imgs[3], imgs[4]], imgs[0]]
    instructions = [
        None,
        "Represent the given image.",
        "Represent the given image with the following question:",
        None,
        "Represent the given image.",
    ]
    return texts, images, instructions
