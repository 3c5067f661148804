"""The bottom layer: the input types, the two error types and the row layout every processor shares.

Nothing here imports mmembed, so any module may import it without pulling in the model, the data pipeline or
training code (docs/architecture.md, "Layers").
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

__all__ = [
    "ImageRef",
    "VideoRef",
    "VIDEO_PLACEHOLDER",
    "Side",
    "Sample",
    "ConfigError",
    "InputError",
    "layout_side",
    "item_kinds",
]

# A path (relative paths already resolved against the image root), encoded bytes, or a decoded image.
ImageRef = str | os.PathLike | bytes | Image.Image
# A video file (path or encoded bytes) or its frames (images, image paths or (H, W, 3) uint8 arrays), see
# :func:`mmembed.video.load_video`.
VideoRef = str | os.PathLike | bytes | Sequence[Any]

#: Where a video goes in a row's text: MMEB-V2 / VLM2Vec-V2's marker (as ``<|image_1|>`` is MMEB's for images).
VIDEO_PLACEHOLDER = "<|video_1|>"


@dataclass
class Side:
    """One input to the encoder: an optional instruction, optional text, zero or more images and videos.

    ``text`` may contain the backbone's image placeholder where each image goes and :data:`VIDEO_PLACEHOLDER`
    where each video goes; the images (videos) of a text with no image (video) placeholder are placed before it.
    """

    instruction: str | None = None
    text: str | None = None
    images: list[ImageRef] = field(default_factory=list)
    videos: list[VideoRef] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.text and self.text.strip()) and not self.images and not self.videos


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


def layout_side(
    side: Side,
    row: Any,
    placeholder: str,
    max_images: int,
    video_placeholder: str = VIDEO_PLACEHOLDER,
    max_videos: int | None = None,
) -> tuple[int, str, str]:
    """Check one row and lay it out as VLM2Vec does, ``<image> instruction text`` (docs/data.md, "Layout").

    Images (videos) at the start of the text, or all of them when the text has no image (video) placeholder, come
    first (images before videos), then the instruction and the text, so an instruction given in its own field and
    the same words inline in the text (MMEB-train's ``qry``) give the same sequence.

    Returns:
        (number of leading images and videos, the stripped instruction, the rest of the text with its placeholders).

    Raises:
        InputError: an empty row, too many images or videos, or placeholders that do not match them (names the row).
    """
    videos = getattr(side, "videos", None) or []
    if side.text is None and not side.images and not videos and not side.instruction:
        raise InputError(f"row {row}: empty input (no text, no image, no video, no instruction)")
    text, n_img, n_vid = side.text or "", len(side.images), len(videos)
    if n_img > max_images:
        raise InputError(f"row {row}: {n_img} images, more than max_images_per_input={max_images}")
    limit = max_images if max_videos is None else max_videos
    if n_vid > limit:
        raise InputError(f"row {row}: {n_vid} videos, more than {limit} per input")
    counts = {placeholder: text.count(placeholder), video_placeholder: text.count(video_placeholder) if n_vid else 0}
    prefix = ""
    for ph, n, what in ((placeholder, n_img, "image"), (video_placeholder, n_vid, "video")):
        if counts[ph] == 0 and n:
            prefix, counts[ph] = prefix + ph * n, n
        if counts[ph] != n:
            raise InputError(
                f"row {row}: the text has {counts[ph]} {what} placeholder(s) '{ph}' but {n} {what}(s) given"
            )
    text = prefix + text
    marks = [p for p in (placeholder, video_placeholder) if counts[p]]
    lead, rest = 0, text.lstrip()
    while marks:
        hit = next((p for p in marks if rest.startswith(p)), None)
        if hit is None:
            break
        lead, rest = lead + 1, rest[len(hit) :].lstrip()
    if lead == 0:
        rest = text
    return lead, (side.instruction or "").strip(), rest


def item_kinds(text: str, placeholder: str, video_placeholder: str = VIDEO_PLACEHOLDER) -> tuple[list[str], list[str]]:
    """``text`` cut at its image and video placeholders: (the kinds in order, ``image`` / ``video``; the text pieces
    between them, one more than the kinds)."""
    marks = [p for p in (placeholder, video_placeholder) if p]
    if not marks:
        return [], [text]
    pattern = "|".join(re.escape(p) for p in sorted(marks, key=len, reverse=True))
    kinds, chunks, last = [], [], 0
    for m in re.finditer(pattern, text):
        chunks.append(text[last : m.start()])
        kinds.append("image" if m.group() == placeholder else "video")
        last = m.end()
    chunks.append(text[last:])
    return kinds, chunks
