"""What every processor shares: the row layout, text truncation, image and video decoding, GradCache splits, device
moves.

A processor turns :class:`~mmembed.types.Side` rows into one padded batch (padded to its longest row, never to a
fixed length) and owns that batch's layout: :meth:`BaseProcessor.split` cuts it into GradCache chunks and
:meth:`BaseProcessor.to` moves it to a device. Subclasses: :class:`~mmembed.processing.Processor` (composed models:
mmembed tokenizes, expands placeholders and transforms images) and :class:`~mmembed.processing.NativeProcessor`
(native VLMs: the model's own HF processor does both).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from mmembed.images import DEFAULT_MAX_PIXELS, ImageError, load_image
from mmembed.types import VIDEO_PLACEHOLDER, InputError, Side, item_kinds, layout_side

__all__ = ["BaseProcessor", "keep_counts"]

log = logging.getLogger(__name__)


def keep_counts(counts: Sequence[int], budget: int) -> list[int] | None:
    """Tokens to keep per text chunk so the row fits ``budget``: cut from the end (the last chunk first), never an
    image. ``None`` when the row already fits."""
    excess = sum(counts) - budget
    if excess <= 0:
        return None
    keep = list(counts)
    for j in reversed(range(len(keep))):
        cut = min(excess, keep[j])
        keep[j] -= cut
        excess -= cut
        if excess <= 0:
            break
    return keep


class BaseProcessor:
    """Shared state and helpers; subclasses implement ``__call__(sides, rows) -> batch``.

    Attributes: ``tokenizer``, ``placeholder`` (mmembed's image placeholder in texts), ``placeholder_id`` (the id
    the batch holds per visual token), ``image_tokens`` (visual tokens per image, exact or an upper bound),
    ``max_length`` (text-token budget per row), ``padding_side``, ``max_pixels`` (decompression-bomb guard),
    ``max_images`` (per row), ``transform`` (mmembed's image transform, ``None`` when the HF processor resizes).
    """

    tokenizer: Any
    placeholder: str
    placeholder_id: int
    image_tokens: int
    max_length: int
    padding_side: str
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_images: int = 8
    transform: Any = None
    _warned_truncation: bool = False  # one truncation warning per processor
    #: per-image tensors besides ``pixel_values`` (sliced by the rows' image counts in :meth:`split`)
    image_keys: tuple[str, ...] = ()
    #: a (N_img, 3) key whose row product is each image's number of ``pixel_values`` rows (flattened patches)
    patch_grid_key: str | None = None
    #: ``layout: vlm2vec``: instruction and text joined exactly as VLM2Vec's ``process_input_text`` does
    join_as_vlm2vec: bool = False
    #: where a video goes in a row's text; a processor without :attr:`video_options` refuses rows with videos
    video_placeholder: str = VIDEO_PLACEHOLDER
    #: how videos are sampled and resized (:class:`mmembed.video.VideoOptions`); ``None``: no video input
    video_options: Any = None
    #: visual tokens per video (an estimate for length grouping)
    video_tokens: int = 0
    #: per-video tensors besides ``pixel_values_videos`` (sliced by the rows' video counts in :meth:`split`)
    video_keys: tuple[str, ...] = ()
    #: a (N_vid, 3) key whose row product is each video's number of ``pixel_values_videos`` rows (Qwen's patches)
    video_grid_key: str | None = None

    def __call__(self, sides: Sequence[Side], rows: Sequence[Any] | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------
    # rows

    def length(self, side: Side) -> int:
        """Cheap length estimate in tokens (for grouping by length; no tokenization)."""
        chars = len(side.text or "") + len(side.instruction or "")
        videos = len(getattr(side, "videos", None) or [])
        return chars // 3 + len(side.images) * self.image_tokens + videos * self.video_tokens + self.n_special

    @property
    def n_special(self) -> int:
        """Tokens a row carries besides its text and images (BOS, EOS)."""
        return 1

    def check_row(self, side: Side, row: Any, rest: str) -> None:
        """A subclass's own refusals for one row (after the shared layout checks)."""

    def layout(self, side: Side, row: Any) -> tuple[int, int, list[str]]:
        """(leading images, instruction length in characters, text chunks between the other images), in VLM2Vec's
        ``<image> instruction text`` layout (:func:`~mmembed.types.layout_side`)."""
        lead, n_instr, chunks, _ = self.media_layout(side, row)
        return lead, n_instr, chunks

    def media_layout(self, side: Side, row: Any) -> tuple[int, int, list[str], list[str]]:
        """:meth:`layout` with the kind (``image`` / ``video``) of each visual item in order, the ``lead`` leading
        ones first: (leading items, instruction length in characters, text chunks between the others, kinds)."""
        videos = getattr(side, "videos", None) or []
        if videos and self.video_options is None:
            raise InputError(f"row {row}: {len(videos)} video(s) given but this model takes no video input")
        vph = self.video_placeholder if videos else ""
        lead, instruction, rest = layout_side(side, row, self.placeholder, self.max_images, vph or VIDEO_PLACEHOLDER)
        self.check_row(side, row, rest)
        chunks = item_kinds(rest, self.placeholder, vph)[1]
        # the items' order: those the text does not place (images, then videos: layout_side), then the text's
        order = item_kinds(side.text or "", self.placeholder, vph)[0]
        counts = (("image", len(side.images)), ("video", len(videos)))
        kinds = [k for k, n in counts if k not in order for _ in range(n)] + order
        if instruction or (self.join_as_vlm2vec and chunks[0]):
            # VLM2Vec's process_input_text joins ``instruction + " " + text`` even for an empty instruction
            chunks[0] = instruction + (" " + chunks[0] if chunks[0] else "")
        return lead, len(instruction), chunks, kinds

    def warn_truncation(self, row: Any) -> None:
        """One warning per processor: a text longer than the budget lost its end."""
        if not self._warned_truncation:
            log.warning("row %s: text longer than max_length=%d tokens; truncating", row, self.max_length)
            self._warned_truncation = True

    def decode_images(self, sides: Sequence[Side], rows: Sequence[Any]) -> list[Image.Image]:
        """Every image of the batch decoded to RGB, in row order; a bad one raises :class:`InputError` naming it."""
        out = []
        for side, row in zip(sides, rows):
            for img in side.images:
                shown = img if isinstance(img, (str, os.PathLike)) else f"<{type(img).__name__}>"
                try:
                    out.append(load_image(img, self.max_pixels, name=f"row {row}: image {shown}"))
                except ImageError as e:
                    raise InputError(str(e)) from None
        return out

    def decode_videos(self, sides: Sequence[Side], rows: Sequence[Any], options: Any = None) -> list[Any]:
        """Every video of the batch sampled and decoded (:func:`mmembed.video.load_video`, frames as (T, H, W, 3)
        uint8), in row order; a bad one raises :class:`InputError` naming the row and the file."""
        from mmembed.video import VideoError, load_video

        options = options if options is not None else self.video_options
        out = []
        for side, row in zip(sides, rows):
            for vid in getattr(side, "videos", None) or []:
                shown = vid if isinstance(vid, (str, os.PathLike)) else f"<{type(vid).__name__}>"
                try:
                    out.append(load_video(vid, options, output="numpy", name=f"row {row}: video {shown}"))
                except VideoError as e:
                    raise InputError(str(e)) from None
        return out

    # ------------------------------------------------------------------------------------------
    # batches

    def to(self, batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
        """The batch with every tensor on ``device`` (views when it is already there)."""
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def split(self, batch: dict[str, torch.Tensor], chunk_size: int) -> list[dict[str, torch.Tensor]]:
        """The batch cut into chunks of ``chunk_size`` rows (GradCache, eval); views, no copies.

        Row tensors (B, L) are sliced; per-image tensors (``pixel_values`` and :attr:`image_keys`) by the rows'
        image counts; flattened patches (Qwen2-VL's ``pixel_values`` (N_patches, C*T*P*P)) by each image's
        ``t*h*w`` from :attr:`patch_grid_key`; videos alike (``pixel_values_videos`` and :attr:`video_keys` by the
        rows' ``video_counts``, Qwen's flattened video patches by :attr:`video_grid_key`). Columns that are padding in
        every row of a chunk are dropped, so each chunk is padded only to its own longest row; positions come from
        the attention mask and do not change.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk size must be >= 1, got {chunk_size}")
        n = batch["input_ids"].shape[0]
        per_item = {
            "image_counts": ("pixel_values", self.image_keys, self.patch_grid_key),
            "video_counts": ("pixel_values_videos", self.video_keys, self.video_grid_key),
        }
        # offsets live on the CPU whatever the batch's device: they are only read as Python ints, so one copy here
        # replaces a device sync per chunk (and a CPU zero cannot meet a CUDA cumsum)
        offsets = {}
        for count_key, (_, _, grid_key) in per_item.items():
            if count_key not in batch:
                continue
            item = torch.cat([torch.zeros(1, dtype=torch.long), batch[count_key].cpu().cumsum(0)])
            grid = batch.get(grid_key) if grid_key else None
            if grid is not None:  # item i's rows of the pixels: [pix[i], pix[i + 1])
                pix = torch.cat([torch.zeros(1, dtype=torch.long), grid.cpu().prod(dim=-1).cumsum(0)])
            else:
                pix = torch.arange(int(item[-1]) + 1)
            offsets[count_key] = (item, pix)
        skip = {k for count_key, (pixel_key, keys, _) in per_item.items() for k in (count_key, pixel_key, *keys)}
        shape = tuple(batch["input_ids"].shape)
        row_keys = [k for k, v in batch.items() if k not in skip and tuple(v.shape) == shape]
        chunks = []
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            mask = batch["attention_mask"][start:stop]
            cols = mask.any(dim=0).nonzero()
            lo, hi = (int(cols[0]), int(cols[-1]) + 1) if len(cols) else (0, mask.shape[1])
            chunk = {k: batch[k][start:stop, lo:hi] for k in row_keys}
            for count_key, (item, pix) in offsets.items():
                pixel_key, keys, _ = per_item[count_key]
                chunk[count_key] = batch[count_key][start:stop]
                a, b = int(item[start]), int(item[stop])
                if b > a:
                    for key in keys:
                        if key in batch:
                            chunk[key] = batch[key][a:b]
                    if pixel_key in batch:
                        chunk[pixel_key] = batch[pixel_key][int(pix[a]) : int(pix[b])]
            chunks.append(chunk)
        return chunks
