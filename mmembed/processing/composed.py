"""The model's processor: instruction + images + text -> padded token batch and pixel tensor.

Each image placeholder expands to exactly the connector's token count (LLaVA's
``tokenizer_image_token`` splice, ALGORITHMS.md §1 and §8); text is tokenized in one batched call;
batches are padded to their longest row, never to a fixed length. The instruction span is recorded
so mean pooling can leave it out.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from mmembed.data.sample import Side
from mmembed.images import DEFAULT_MAX_PIXELS, ImageError, ImageTransform, load_image

__all__ = ["Processor", "InputError", "layout_side", "split_batch"]

log = logging.getLogger(__name__)


class InputError(ValueError):
    """A bad input row: names the row and what is wrong."""


class Processor:
    """Turns :class:`~mmembed.data.sample.Side` rows into model inputs.

    Args:
        tokenizer: the backbone's tokenizer (with the placeholder token added).
        placeholder: the image placeholder string in texts (e.g. ``<image>``).
        placeholder_id: its token id.
        image_tokens: rows each image expands to (the connector's ``num_tokens``).
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
        self._warned_truncation = False

    def length(self, side: Side) -> int:
        """Cheap length estimate in tokens (for grouping by length; no tokenization)."""
        chars = len(side.text or "") + len(side.instruction or "")
        return chars // 3 + len(side.images) * self.image_tokens + len(self.prefix_ids) + len(self.suffix_ids)

    def _layout(self, side: Side, row: Any) -> tuple[int, int, list[str]]:
        """(leading images, instruction length in characters, text chunks between the other images)."""
        lead, instruction, rest = layout_side(side, row, self.placeholder, self.max_images)
        if side.images and self.transform is None:
            raise InputError(f"row {row}: images given but the model has no vision encoder")
        chunks = rest.split(self.placeholder)
        if instruction:
            chunks[0] = instruction + (" " + chunks[0] if chunks[0] else "")
        return lead, len(instruction), chunks

    def tokenize(self, sides: Sequence[Side], rows: Sequence[Any] | None = None) -> list[tuple[list[int], slice]]:
        """Token ids per row (placeholders expanded) and the span of the instruction tokens."""
        rows = list(rows) if rows is not None else list(range(len(sides)))
        layouts = [self._layout(s, r) for s, r in zip(sides, rows)]
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
            excess = sum(len(s) for s in segs) - budget
            if excess > 0:  # cut text from the end; image placeholders are never cut
                if not self._warned_truncation:
                    log.warning("row %s: text longer than max_length=%d tokens; truncating", row, self.max_length)
                    self._warned_truncation = True
                for seg in reversed(segs):
                    cut = min(excess, len(seg))
                    del seg[len(seg) - cut :]
                    excess -= cut
                    if excess <= 0:
                        break
            ids = self.prefix_ids + image_run * lead
            start = len(ids)
            for i, chunk in enumerate(segs):
                ids = ids + (image_run if i else []) + chunk
            out.append((ids + self.suffix_ids, slice(start, start + min(n_instr, len(segs[0])))))
        return out

    def load_images(self, sides: Sequence[Side], rows: Sequence[Any]) -> torch.Tensor | None:
        """All images of the batch, in row order: (N_img, 3, S, S), or ``None`` if there are none."""
        n = sum(len(s.images) for s in sides)
        if n == 0:
            return None
        assert self.transform is not None
        size = self.transform.size
        pixels = torch.empty(n, 3, size, size)
        k = 0
        for side, row in zip(sides, rows):
            for img in side.images:
                shown = img if isinstance(img, (str, os.PathLike)) else f"<{type(img).__name__}>"
                label = f"row {row}: image {shown}"
                try:
                    pil = load_image(img, self.max_pixels, name=label)
                except ImageError as e:
                    raise InputError(str(e)) from None
                pixels[k] = self.transform(pil)
                k += 1
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


def split_batch(batch: dict[str, torch.Tensor], chunk_size: int) -> list[dict[str, torch.Tensor]]:
    """Split a processor batch into chunks of ``chunk_size`` rows (GradCache, eval).

    Row tensors (B, L) are sliced; per-image tensors (``pixel_values`` (N_img, ...), ``image_grid_thw``
    (N_img, 3), ``image_sizes`` (N_img, 2)) are sliced by the rows' image counts (views, no copy). Qwen2-VL's
    flattened ``pixel_values`` (N_patches, C*T*P*P) is sliced by each image's patch count ``t*h*w`` from
    ``image_grid_thw``. Columns that are padding in every row of a chunk are dropped, so each chunk is padded
    only to its own longest row; positions come from the attention mask and do not change.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk size must be >= 1, got {chunk_size}")
    n = batch["input_ids"].shape[0]
    img_offsets = torch.cat([torch.zeros(1, dtype=torch.long), batch["image_counts"].cumsum(0)])
    grid = batch.get("image_grid_thw")
    patch_offsets = None
    if grid is not None:
        patch_offsets = torch.cat([torch.zeros(1, dtype=torch.long), grid.prod(dim=-1).cumsum(0)])
    per_image = ("image_counts", "pixel_values", "image_grid_thw", "image_sizes")
    shape = tuple(batch["input_ids"].shape)
    row_keys = [k for k, v in batch.items() if k not in per_image and tuple(v.shape) == shape]
    chunks = []
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        mask = batch["attention_mask"][start:stop]
        cols = mask.any(dim=0).nonzero()
        lo, hi = (int(cols[0]), int(cols[-1]) + 1) if len(cols) else (0, mask.shape[1])
        chunk = {k: batch[k][start:stop, lo:hi] for k in row_keys}
        chunk["image_counts"] = batch["image_counts"][start:stop]
        a, b = int(img_offsets[start]), int(img_offsets[stop])
        if b > a:
            for key in ("image_grid_thw", "image_sizes"):
                if key in batch:
                    chunk[key] = batch[key][a:b]
            if "pixel_values" in batch:
                if patch_offsets is not None:
                    chunk["pixel_values"] = batch["pixel_values"][int(patch_offsets[a]) : int(patch_offsets[b])]
                else:
                    chunk["pixel_values"] = batch["pixel_values"][a:b]
        chunks.append(chunk)
    return chunks


def layout_side(side: Side, row: Any, placeholder: str, max_images: int) -> tuple[int, str, str]:
    """Check one row and lay it out as VLM2Vec does, ``<image> instruction text`` (ANCHORS.md §1.3).

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
