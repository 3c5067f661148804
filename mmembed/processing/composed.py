"""The composed model's processor: instruction + images + text -> padded token batch and pixel tensor.

Each image placeholder expands to exactly the visual path's token count (LLaVA's ``tokenizer_image_token``
splice, docs/algorithms.md §1 and §8); text is tokenized in one batched call; batches are padded to their longest
row, never to a fixed length. The instruction span is recorded so mean pooling can leave it out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmembed.images import DEFAULT_MAX_PIXELS, ImageTransform
from mmembed.processing.base import BaseProcessor, keep_counts
from mmembed.types import InputError, Side

__all__ = ["Processor"]


class Processor(BaseProcessor):
    """Turns :class:`~mmembed.types.Side` rows into model inputs.

    Args:
        tokenizer: the backbone's tokenizer (with the placeholder token added).
        placeholder: the image placeholder string in texts (e.g. ``<image>``).
        placeholder_id: its token id.
        image_tokens: rows each image expands to (the visual path's ``num_tokens``).
        transform: the vision encoder's preprocessing (``None`` for text-only models).
        max_length: text-token budget per row; image tokens come on top and are never truncated.
        padding_side: ``left`` or ``right``.
        add_eos: append EOS (last-token pooling reads it).
        max_pixels: refuse larger images before decoding.
        max_images: most images allowed in one row.
    """

    def __init__(
        self,
        tokenizer: Any,
        placeholder: str,
        placeholder_id: int,
        image_tokens: int,
        transform: ImageTransform | None,
        max_length: int = 512,
        padding_side: str = "left",
        add_eos: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_images: int = 8,
    ) -> None:
        self.tokenizer = tokenizer
        self.placeholder = placeholder
        self.placeholder_id = int(placeholder_id)
        self.image_tokens = int(image_tokens)
        self.transform = transform
        self.max_length = int(max_length)
        self.padding_side = padding_side
        self.max_pixels = int(max_pixels)
        self.max_images = int(max_images)
        self.pad_id = int(tokenizer.pad_token_id)
        specials = list(tokenizer("", add_special_tokens=True)["input_ids"])
        eos = tokenizer.eos_token_id
        if specials and eos is not None and specials[-1] == eos:
            specials = specials[:-1]
        self.prefix_ids = specials  # BOS for Llama-style tokenizers, nothing for Qwen
        self.suffix_ids = [int(eos)] if add_eos and eos is not None else []

    @property
    def n_special(self) -> int:
        return len(self.prefix_ids) + len(self.suffix_ids)

    def check_row(self, side: Side, row: Any, rest: str) -> None:
        if side.images and self.transform is None:
            raise InputError(f"row {row}: images given but the model has no vision encoder")

    def tokenize(self, sides: Sequence[Side], rows: Sequence[Any] | None = None) -> list[tuple[list[int], slice]]:
        """Token ids per row (placeholders expanded) and the span of the instruction tokens."""
        rows = list(rows) if rows is not None else list(range(len(sides)))
        layouts = [self.layout(s, r) for s, r in zip(sides, rows)]
        strings = [c for _, _, chunks in layouts for c in chunks]
        enc = self.tokenizer(strings, add_special_tokens=False, return_offsets_mapping=True) if strings else {}
        encoded, offsets = enc.get("input_ids", []), enc.get("offset_mapping", [])
        out, pos = [], 0
        budget = self.max_length - len(self.prefix_ids) - len(self.suffix_ids)
        image_run = [self.placeholder_id] * self.image_tokens
        for (lead, instr_chars, chunks), row in zip(layouts, rows):
            segs = [list(x) for x in encoded[pos : pos + len(chunks)]]
            n_instr = sum(1 for start, _ in offsets[pos] if start < instr_chars) if instr_chars else 0
            pos += len(chunks)
            keep = keep_counts([len(seg) for seg in segs], budget)
            if keep is not None:  # cut text from the end; image placeholders are never cut
                self.warn_truncation(row)
                segs = [seg[:k] for seg, k in zip(segs, keep)]
            ids = self.prefix_ids + image_run * lead
            start = len(ids)
            for i, chunk in enumerate(segs):
                ids = ids + (image_run if i else []) + chunk
            out.append((ids + self.suffix_ids, slice(start, start + min(n_instr, len(segs[0])))))
        return out

    def load_images(self, sides: Sequence[Side], rows: Sequence[Any]) -> torch.Tensor | None:
        """All images of the batch, in row order: (N_img, 3, S, S), or ``None`` if there are none."""
        images = self.decode_images(sides, rows)
        if not images:
            return None
        assert self.transform is not None
        size = self.transform.size
        pixels = torch.empty(len(images), 3, size, size)
        for k, pil in enumerate(images):
            pixels[k] = self.transform(pil)
        return pixels

    def __call__(self, sides: Sequence[Side], rows: Sequence[Any] | None = None) -> dict[str, torch.Tensor]:
        """Collate rows into a batch padded to its longest row.

        Returns:
            ``input_ids`` (B, L), ``attention_mask`` (B, L), ``pool_mask`` (B, L) (instruction zeroed),
            ``image_counts`` (B,), and ``pixel_values`` (N_img, 3, S, S) when any row has an image.
        """
        rows = list(rows) if rows is not None else list(range(len(sides)))
        tokens = self.tokenize(sides, rows)
        batch, length = len(tokens), max((len(ids) for ids, _ in tokens), default=0)
        input_ids = torch.full((batch, length), self.pad_id, dtype=torch.long)
        attention = torch.zeros(batch, length, dtype=torch.long)
        pool = torch.zeros(batch, length, dtype=torch.long)
        n_prefix = len(self.prefix_ids)
        for i, (ids, instr) in enumerate(tokens):
            start = length - len(ids) if self.padding_side == "left" else 0
            input_ids[i, start : start + len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention[i, start : start + len(ids)] = 1
            pool[i, start + n_prefix : start + len(ids)] = 1  # BOS and the instruction are not pooled
            pool[i, start + instr.start : start + instr.stop] = 0
        out = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "pool_mask": pool,
            "image_counts": torch.tensor([len(s.images) for s in sides], dtype=torch.long),
        }
        pixels = self.load_images(sides, rows)
        if pixels is not None:
            out["pixel_values"] = pixels
        return out
