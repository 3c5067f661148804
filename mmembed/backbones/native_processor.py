"""The processor of native VLM backbones: :class:`~mmembed.data.sample.Side` rows -> the HF processor's batch.

Rows are laid out as VLM2Vec does (``<image tokens> instruction text``, ANCHORS.md §1.3) and handed to the model's
own transformers processor, which resizes images and expands each image text to its visual tokens.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from mmembed.data.sample import Side
from mmembed.images import DEFAULT_MAX_PIXELS, ImageError, load_image
from mmembed.processing import InputError, layout_side

__all__ = ["NativeProcessor"]

log = logging.getLogger(__name__)


class NativeProcessor:
    """:class:`~mmembed.data.sample.Side` rows -> the HF processor's batch for a native VLM.

    Each mmembed placeholder (``<image>``) becomes the model's own image text (``image_text``: Qwen2-VL's
    ``<|vision_start|><|image_pad|><|vision_end|>``, LLaVA's ``<image>``); the HF processor then expands it to
    the per-image token count (which varies per image for Qwen2-VL's dynamic resolution).

    Args:
        hf_processor: a transformers processor (``Qwen2VLProcessor``, ``LlavaProcessor``, ...).
        image_text: the text the HF processor expects per image.
        image_token_id: the model's image token id (``config.image_token_id``).
        placeholder: mmembed's placeholder in texts.
        image_tokens: visual tokens per image, an estimate for length grouping (exact for LLaVA).
        padding_side: ``left`` (VLM2Vec's Qwen2-VL setting) or ``right``.
        add_eos: append the tokenizer's EOS so last-token pooling reads it.
        max_pixels: refuse larger images before decoding (decompression-bomb guard, not the resize budget).
        max_images: most images in one row.
        max_length: only feeds the length estimate: texts are not truncated here (cutting inside the HF
            processor's expanded image runs would break them); keep inputs within the model's context.
    """

    transform = None  # no mmembed image transform: the HF image processor resizes and normalizes

    def __init__(
        self,
        hf_processor: Any,
        image_text: str,
        image_token_id: int,
        placeholder: str = "<image>",
        image_tokens: int = 0,
        padding_side: str = "left",
        add_eos: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_images: int = 8,
        max_length: int = 512,
    ) -> None:
        self.hf_processor = hf_processor
        self.tokenizer = hf_processor.tokenizer
        self.image_text = image_text
        self.placeholder = placeholder
        self.placeholder_id = int(image_token_id)
        self.image_tokens = int(image_tokens)
        self.padding_side = padding_side
        self.max_pixels = int(max_pixels)
        self.max_images = int(max_images)
        self.max_length = int(max_length)  # text budget, used only by the length estimate (never truncates)
        eos = self.tokenizer.eos_token
        self.suffix = eos if add_eos and eos is not None else ""

    def length(self, side: Side) -> int:
        """Cheap length estimate in tokens (for grouping by length; no tokenization)."""
        chars = len(side.text or "") + len(side.instruction or "")
        return chars // 3 + len(side.images) * self.image_tokens + 1

    def text(self, side: Side, row: Any) -> str:
        """The HF processor's text for one row: leading images, then ``instruction text`` (VLM2Vec layout)."""
        lead, instruction, rest = layout_side(side, row, self.placeholder, self.max_images)
        if self.image_text != self.placeholder and self.image_text in rest:
            raise InputError(f"row {row}: the text contains the model's own image text {self.image_text!r}")
        if instruction:
            rest = instruction + (" " + rest if rest else "")
        return self.image_text * lead + rest.replace(self.placeholder, self.image_text) + self.suffix

    def load_images(self, sides: Sequence[Side], rows: Sequence[Any]) -> list[Any]:
        out = []
        for side, row in zip(sides, rows):
            for img in side.images:
                shown = img if isinstance(img, (str, os.PathLike)) else f"<{type(img).__name__}>"
                try:
                    out.append(load_image(img, self.max_pixels, name=f"row {row}: image {shown}"))
                except ImageError as e:
                    raise InputError(str(e)) from None
        return out

    def __call__(self, sides: Sequence[Side], rows: Sequence[Any] | None = None) -> dict[str, torch.Tensor]:
        """Collate rows into the HF processor's batch plus mmembed's keys.

        Returns:
            the HF processor's tensors (``input_ids`` (B, L), ``attention_mask`` (B, L), and with images
            ``pixel_values``: (N_patches, C*T*P*P) with ``image_grid_thw`` (N_img, 3) for Qwen2-VL,
            (N_img, 3, S, S) for LLaVA), plus ``pool_mask`` (B, L) (= attention mask) and ``image_counts`` (B,).
        """
        rows = list(rows) if rows is not None else list(range(len(sides)))
        texts = [self.text(s, r) for s, r in zip(sides, rows)]
        images = self.load_images(sides, rows)
        enc = self.hf_processor(
            text=texts,
            images=images or None,
            padding=True,
            padding_side=self.padding_side,
            return_tensors="pt",
        )
        out = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
        out["attention_mask"] = out["attention_mask"].long()
        out["pool_mask"] = out["attention_mask"].clone()
        out["image_counts"] = torch.tensor([len(s.images) for s in sides], dtype=torch.long)
        return out
