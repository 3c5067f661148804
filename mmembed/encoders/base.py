"""The vision-encoder contract every backend meets, so connectors never branch on the backend."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmembed.images import ImageTransform

__all__ = ["VisionEncoder"]


class VisionEncoder(nn.Module):
    """Base class: images in, patch tokens out.

    Subclasses set ``out_dim`` (D_v), ``image_size`` (square input side) and ``transform`` (the
    encoder's own preprocessing), and implement :meth:`forward`.
    """

    out_dim: int
    image_size: int
    transform: ImageTransform

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalized pixels -> (B, N, D_v) patch tokens in raster order (prefix tokens dropped)."""
        raise NotImplementedError

    def grid(self) -> tuple[int, int]:
        """(h, w) of the token grid for ``image_size`` inputs; h * w == N."""
        raise NotImplementedError

    def global_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, D_v) one vector per image (CLS or mean of the patch tokens), for late fusion."""
        return self.forward(pixel_values).mean(dim=1)

    def export_args(self) -> dict[str, Any]:
        """Arguments that rebuild this encoder offline (no download, weights loaded separately)."""
        args = dict(getattr(self, "init_args", {}))
        if "pretrained" in args:
            args["pretrained"] = False
        return args


def tokens_from_feature_map(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C) in raster order; (B, N, C) passes through."""
    if x.ndim == 4:
        return x.flatten(2).transpose(1, 2)
    return x
