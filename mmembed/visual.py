"""The visual path: images -> the visual rows a backbone splices into its sequence (docs/architecture.md §2).

``vision encoder -> connector -> merger (optional)``, one :class:`VisualItem` per image. The composed model builds a
:class:`ComposedVisual` from its slots; a native VLM gives its own (its tower and built-in projector, or an mmembed
connector in the projector's place, see :mod:`mmembed.backbones.native`). The visual path also owns the
blank-image dummy: on a text-only batch in training (or ZeRO-3 eval) the model adds ``0 * blank()`` so every rank
and GradCache chunk runs the same modules (ZeRO-3 gathers parameters per module call and ZeRO-2 reduces in
buckets: both hang or fail when ranks differ; LLaVA adds ``0 * visual`` for the same reason).

A visual path is a plain object, not an ``nn.Module``: it *uses* modules the model owns (``vision.*``,
``connector.*``, the native tower inside ``backbone.*``), so every weight is registered, saved and sharded once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmembed.images import ImageTransform

__all__ = ["VisualItem", "VisualPath", "ComposedVisual", "grid_positions", "line_positions", "has_pixels"]


@dataclass
class VisualItem:
    """One image's tokens for the LLM.

    Attributes:
        tokens: (N, d) embeddings at the LLM width.
        pos: (3, N) long (t, h, w) positions relative to the image's first position.
        span: positions the image occupies; the next text token sits at ``offset + span``.
        index: (N,) long, each token's index among the image's tokens before merging (``None``: all, in order).
        origin: token count before merging.
    """

    tokens: torch.Tensor
    pos: torch.Tensor
    span: int
    index: torch.Tensor | None = None
    origin: int = -1

    def __post_init__(self) -> None:
        if self.origin < 0:
            self.origin = self.tokens.shape[0]

    def select(self, idx: torch.Tensor, tokens: torch.Tensor) -> VisualItem:
        """Survivors ``idx`` (N',) of a merge with their merged ``tokens`` (N', d); positions and span kept."""
        idx = idx.to(self.pos.device)
        index = idx if self.index is None else self.index[idx]
        return VisualItem(tokens, self.pos[:, idx], self.span, index, self.origin)


def grid_positions(t: int, h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """(3, t*h*w) positions (t, h, w) of a grid in raster order."""
    ti = torch.arange(t, device=device).view(-1, 1, 1).expand(t, h, w)
    hi = torch.arange(h, device=device).view(1, -1, 1).expand(t, h, w)
    wi = torch.arange(w, device=device).view(1, 1, -1).expand(t, h, w)
    return torch.stack([ti.flatten(), hi.flatten(), wi.flatten()])


def line_positions(n: int, device: torch.device | None = None) -> torch.Tensor:
    """(3, n) positions of n tokens in a line (1-D RoPE, or visual tokens without a grid)."""
    return torch.arange(n, device=device).expand(3, n)


def has_pixels(batch: dict[str, Any]) -> bool:
    pixels = batch.get("pixel_values")
    return pixels is not None and pixels.shape[0] > 0


def merge_items(items: list[VisualItem], merger: Any) -> list[VisualItem]:
    """Each image's tokens merged by ``merger`` (a :class:`~mmembed.tokens.Merger`); survivors keep their cell."""
    out = []
    for item in items:
        tokens, idx = merger.reduce(item.tokens[None])  # (1, N', d), (1, N') survivors in order
        out.append(item.select(idx[0], tokens[0]))
    return out


class VisualPath:
    """The contract: ``path(batch) -> list[VisualItem] | None`` and ``blank() -> ()`` scalar.

    ``None`` means there is nothing to splice: a text-only batch, or a native VLM whose stock vision path runs inside
    its own forward (bit-exact with transformers). ``tower`` is the vision encoder ``train.freeze: [vision]``
    freezes; ``transform`` the image preprocessing of a composed processor (``None``: the HF processor does it).
    """

    tower: nn.Module | None = None
    transform: ImageTransform | None = None

    def __call__(self, batch: dict[str, torch.Tensor]) -> list[VisualItem] | None:
        raise NotImplementedError

    def blank(self) -> torch.Tensor:
        """Sum of the visual path's output on one blank image (a 0-dim tensor), for the uniform-modules dummy."""
        raise NotImplementedError

    def num_tokens(self) -> int:
        """Visual tokens per image (an upper bound where it varies per image)."""
        raise NotImplementedError

    def global_feature(self, batch: dict[str, torch.Tensor], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row global image feature (B, D_v) and ``has_image`` (B,) bool, for late fusion."""
        raise NotImplementedError(f"{type(self).__name__} has no global image feature (late fusion)")


class ComposedVisual(VisualPath):
    """``vision -> connector -> merger`` of a composed model: fixed-size images, the same count per image.

    Args:
        vision: the encoder (``forward(pixels (N_img, 3, S, S)) -> (N_img, N, D_v)``, ``grid()``).
        connector: ``forward(tokens, grid) -> (N_img, N', d)``.
        merger: optional :class:`~mmembed.tokens.Merger` (AIM, docs/algorithms.md §5a).
    """

    def __init__(self, vision: nn.Module, connector: nn.Module, merger: nn.Module | None = None) -> None:
        self.vision, self.connector, self.merger = vision, connector, merger
        self.tower, self.transform = vision, vision.transform

    def num_tokens(self) -> int:
        n = self.connector.num_tokens(self.vision.grid())
        return self.merger.num_tokens(n) if self.merger is not None else n

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N_img, 3, S, S) -> (N_img, N'', d): connector, then merger outputs."""
        param = next(self.vision.parameters())
        tokens = self.vision(pixel_values.to(device=param.device, dtype=param.dtype))  # (N_img, N, D_v)
        feats = self.connector(tokens, self.vision.grid())  # (N_img, N', d)
        return self.merger(feats) if self.merger is not None else feats

    def __call__(self, batch: dict[str, torch.Tensor]) -> list[VisualItem] | None:
        if not has_pixels(batch):
            return None
        feats = self.features(batch["pixel_values"])
        pos = line_positions(feats.shape[1], feats.device)
        return [VisualItem(f, pos, f.shape[0]) for f in feats]

    def blank(self) -> torch.Tensor:
        size = self.vision.image_size
        return self.features(torch.zeros(1, 3, size, size)).sum()

    def global_feature(self, batch: dict[str, torch.Tensor], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean of each row's images' ``vision.global_feature`` (CLS / pooled), zeros for rows without images."""
        param = next(self.vision.parameters())
        counts = batch["image_counts"].to(param.device)
        if not has_pixels(batch):
            return torch.zeros(rows, self.vision.out_dim, device=param.device), counts > 0
        feats = self.vision.global_feature(batch["pixel_values"].to(device=param.device, dtype=param.dtype))
        row = torch.repeat_interleave(torch.arange(rows, device=feats.device), counts)
        summed = torch.zeros(rows, feats.shape[-1], device=feats.device, dtype=feats.dtype).index_add(0, row, feats)
        return summed / counts.clamp_min(1)[:, None].to(feats.dtype), counts > 0
