"""SPHINX-style mixing of several vision encoders: the same image through each, token grids aligned and
concatenated along channels before the connector.

Lin et al., "SPHINX: The Joint Mixing of Weights, Tasks, and Visual Embeddings for Multi-modal LLMs",
arXiv 2311.07575; Alpha-VLLM/LLaMA2-Accessory ``accessory/model/LLM/llama_ens*.py``. docs/architecture.md §3.

Preprocessing (one shared transform, per-encoder adaptation on the tensor): the processor produces a single
pixel tensor at the largest encoder size with mean 0 / std 1 (pixels in [0, 1]); each encoder then resizes it
to its own ``image_size`` (bicubic, antialiased) and applies its own mean/std. No processor change is needed;
the cost is a second resampling for encoders smaller than the largest one (torch instead of PIL resize).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmembed.encoders.base import VisionEncoder
from mmembed.images import ImageTransform
from mmembed.registry import VISION, instantiate
from mmembed.types import ConfigError

__all__ = ["MultiEncoder", "resample_grid"]


def resample_grid(tokens: torch.Tensor, grid: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, D) raster tokens -> (B, H*W, D) on ``target``: adaptive average pooling down, bilinear up."""
    if tuple(grid) == tuple(target):
        return tokens
    b, _, d = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, d, *grid)
    if target[0] <= grid[0] and target[1] <= grid[1]:
        x = F.adaptive_avg_pool2d(x, target)
    else:
        x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
    return x.flatten(2).transpose(1, 2)


@VISION.register("multi")
class MultiEncoder(VisionEncoder):
    """Several encoders on one image; ``out_dim`` is the sum of theirs.

    Args:
        encoders: nested specs, e.g. ``[{type: timm, name: ...}, {type: open_clip, ...}]`` (not ``multi``).
        grid: common token grid ``[h, w]``; defaults to the smallest encoder grid (by token count).
    """

    example_args = [
        {
            "encoders": [
                {"type": "timm", "name": "test_vit", "image_size": 32},
                {"type": "timm", "name": "test_vit", "image_size": 64},
            ]
        },
    ]

    def __init__(self, encoders: list[dict[str, Any]], grid: list[int] | None = None) -> None:
        super().__init__()
        self.check_config({"encoders": encoders, "grid": grid}, prefix="model.vision.")
        self.encoders = nn.ModuleList([instantiate(VISION, dict(spec)) for spec in encoders])
        grids = [tuple(e.grid()) for e in self.encoders]
        for spec, g in zip(encoders, grids):
            if g[0] == 1 and g[1] > 1:  # tokens without a 2-D layout (the base class's (1, N) fallback)
                raise ConfigError(
                    "model.vision.encoders",
                    f"encoder {spec.get('type')}:{spec.get('name', '')} has a non-spatial token grid {g}; "
                    "allowed: encoders with a 2-D patch grid (ViTs, convnets)",
                )
        self._grid = tuple(grid) if grid else min(grids, key=lambda g: g[0] * g[1])
        self.out_dim = sum(e.out_dim for e in self.encoders)
        self.image_size = max(e.image_size for e in self.encoders)
        self.transform = ImageTransform(size=self.image_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        for i, e in enumerate(self.encoders):
            self.register_buffer(f"mean{i}", torch.tensor(e.transform.mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer(f"std{i}", torch.tensor(e.transform.std).view(1, 3, 1, 1), persistent=False)

    @staticmethod
    def check_config(args: dict[str, Any], prefix: str = "") -> None:
        specs = args.get("encoders")
        key = f"{prefix}encoders"
        if not isinstance(specs, (list, tuple)) or len(specs) < 2:
            raise ConfigError(key, "must be a list of at least two encoder specs {type: NAME, ...}")
        allowed = [n for n in VISION.names() if n != "multi"]
        for i, spec in enumerate(specs):
            if not isinstance(spec, dict) or spec.get("type") not in allowed:
                got = spec.get("type") if isinstance(spec, dict) else spec
                raise ConfigError(key, f"entry {i}: type {got!r}; allowed: {', '.join(allowed)}")
            problems = VISION.check_args(spec["type"], {k: v for k, v in spec.items() if k != "type"})
            if problems:
                raise ConfigError(key, f"entry {i}: {'; '.join(problems)}")
        grid = args.get("grid")
        if grid is not None and (len(grid) != 2 or min(grid) < 1):
            raise ConfigError(f"{prefix}grid", f"must be [h, w] with positive sides, got {grid!r}")

    def _inputs(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Shared [0, 1] pixels (B, 3, S, S) -> each encoder's resized, normalized input."""
        out = []
        for i, e in enumerate(self.encoders):
            x = pixel_values
            if x.shape[-1] != e.image_size:
                x = F.interpolate(x, size=(e.image_size, e.image_size), mode="bicubic", antialias=True)
            out.append((x - getattr(self, f"mean{i}")) / getattr(self, f"std{i}"))
        return out

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, h*w, sum D_v) on the common grid."""
        feats = [resample_grid(e(x), e.grid(), self._grid) for e, x in zip(self.encoders, self._inputs(pixel_values))]
        return torch.cat(feats, dim=-1)

    def grid(self) -> tuple[int, int]:
        return self._grid

    def global_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, sum of the encoders' global widths): each encoder's own global feature, concatenated."""
        return torch.cat([e.global_feature(x) for e, x in zip(self.encoders, self._inputs(pixel_values))], dim=-1)

    def export_args(self) -> dict[str, Any]:
        specs = [{"type": e.registry_name, **e.export_args()} for e in self.encoders]
        return {"encoders": specs, "grid": list(self._grid)}
