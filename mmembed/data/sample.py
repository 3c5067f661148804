"""The one internal sample type every reader produces and every collator consumes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

__all__ = ["ImageRef", "Side", "Sample"]

# A path (relative paths already resolved against the image root), encoded bytes, or a decoded image.
ImageRef = str | os.PathLike | bytes | Image.Image


@dataclass
class Side:
    """One input to the encoder: an optional instruction, optional text, zero or more images.

    ``text`` may contain the backbone's image placeholder where each image goes; when it has none,
    the images are placed before the text.
    """

    instruction: str | None = None
    text: str | None = None
    images: list[ImageRef] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.text and self.text.strip()) and not self.images


@dataclass
class Sample:
    """A training or evaluation example: a query, its positive target and optional hard negatives.

    ``source`` says where it came from (``file:row``) so a bad sample can be reported precisely.
    """

    query: Side
    positive: Side
    negatives: list[Side] = field(default_factory=list)
    dataset: str = ""
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
