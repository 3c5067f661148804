"""The bottom layer: the input types, the two error types and the row layout every processor shares.

Nothing here imports mmembed, so any module may import it without pulling in the model, the data pipeline or
training code (docs/architecture.md, "Layers").
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

__all__ = ["ImageRef", "Side", "Sample", "ConfigError", "InputError", "layout_side"]

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


class ConfigError(ValueError):
    """A recipe problem: ``key`` is the dotted path, ``source`` the recipe file (if any)."""

    def __init__(self, key: str, message: str, source: str | None = None) -> None:
        self.key, self.message, self.source = key, message, source
        where = f" (in {source})" if source else ""
        super().__init__(f"{key}: {message}{where}" if key else f"{message}{where}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across DataLoader workers and ranks
        return (ConfigError, (self.key, self.message, self.source))


class InputError(ValueError):
    """A bad input row: names the row and what is wrong."""


def layout_side(side: Side, row: Any, placeholder: str, max_images: int) -> tuple[int, str, str]:
    """Check one row and lay it out as VLM2Vec does, ``<image> instruction text`` (docs/data.md, "Layout").

    Images at the start of the text (or all images, when the text has no placeholder) come first, then
    the instruction and the text, so an instruction given in its own field and the same words inline in
    the text (MMEB-train's ``qry``) give the same sequence.

    Returns:
        (number of leading images, the stripped instruction, the rest of the text with its placeholders).

    Raises:
        InputError: an empty row, too many images, or placeholders that do not match the images (names the row).
    """
    if side.text is None and not side.images and not side.instruction:
        raise InputError(f"row {row}: empty input (no text, no image, no instruction)")
    text, n_img = side.text or "", len(side.images)
    if n_img > max_images:
        raise InputError(f"row {row}: {n_img} images, more than max_images_per_input={max_images}")
    count = text.count(placeholder)
    if count == 0 and n_img:
        text, count = placeholder * n_img + text, n_img
    if count != n_img:
        raise InputError(
            f"row {row}: the text has {count} image placeholder(s) '{placeholder}' but {n_img} image(s) given"
        )
    lead, rest = 0, text.lstrip()
    while rest.startswith(placeholder):
        lead, rest = lead + 1, rest[len(placeholder) :].lstrip()
    if lead == 0:
        rest = text
    return lead, (side.instruction or "").strip(), rest
