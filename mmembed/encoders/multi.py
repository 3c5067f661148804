"""SPHINX-style mixing of several vision encoders: the same image through each, token grids aligned and
concatenated along channels before the connector.

Lin et al., "SPHINX: The Joint Mixing of Weights, Tasks, and Visual Embeddings for Multi-modal LLMs",
arXiv 2311.07575; Alpha-VLLM/LLaMA2-Accessory ``accessory/model/LLM/llama_ens.py`` (SPHINX; ``llama_ens5.py``,
SPHINX-1k, per sub-image), ``Transformer.encode_image``. docs/algorithms.md §1 (mixed vision encoders).

Common grid. The reference keeps the CLIP ViT-L/14 grid (16x16 at 224 px) and brings the coarser ConvNeXt-XXL map
(8x8 at 256 px) up to it with ``repeat_interleave(2)`` on both spatial axes (nearest-neighbour replication), then
concatenates channels. mmembed does the same by default (``grid: max``): the finest grid, coarse grids replicated
by an integer factor (``F.interpolate(mode="nearest")`` when the factor is not an integer, which the reference never
meets). ``grid: min`` is the behaviour of mmembed before issue #13 (finer grids adaptive-average-pooled down to the
coarsest). Not ported: the reference also prepends one global token per encoder (the ViTs' CLS, the ConvNeXt's mean
over its tokens); the encoder contract here has no prefix tokens (``h * w == N``), and
:meth:`MultiEncoder.global_feature` gives the per-encoder global vectors instead.

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

_GRID_MODES = ("max", "min")
_UPSAMPLE = ("nearest", "bilinear")


def resample_grid(
    tokens: torch.Tensor, grid: tuple[int, int], target: tuple[int, int], upsample: str = "nearest"
) -> torch.Tensor:
    """(B, h*w, D) raster tokens -> (B, H*W, D) on ``target``.

    Down on both axes: adaptive average pooling. Up on both axes: ``upsample="nearest"`` replicates each token
    (``repeat_interleave`` for integer factors, as SPHINX's ``llama_ens.py``; ``F.interpolate`` nearest otherwise),
    ``"bilinear"`` interpolates (``align_corners=False``). Up on one axis and down on the other: bilinear either way.
    """
    if tuple(grid) == tuple(target):
        return tokens
    b, _, d = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, d, *grid)
    (h, w), (th, tw) = grid, target
    if th <= h and tw <= w:
        x = F.adaptive_avg_pool2d(x, target)
    elif upsample == "nearest" and th >= h and tw >= w:
        if th % h == 0 and tw % w == 0:  # the reference's op, exact
            x = x.repeat_interleave(th // h, dim=-2).repeat_interleave(tw // w, dim=-1)
        else:
            x = F.interpolate(x, size=target, mode="nearest")
    else:
        x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
    return x.flatten(2).transpose(1, 2)


@VISION.register("multi")
class MultiEncoder(VisionEncoder):
    """Several encoders on one image; ``out_dim`` is the sum of theirs.

    Args:
        encoders: nested specs, e.g. ``[{type: timm, name: ...}, {type: open_clip, ...}]`` (not ``multi``).
        grid: the common token grid: ``max`` (default, SPHINX: the finest encoder grid by token count, coarser
            grids brought up to it), ``min`` (the coarsest grid, finer ones average-pooled down; mmembed's default
            before issue #13), an integer n (``[n, n]``) or ``[h, w]``.
        upsample: how a coarser grid is brought up to the common one: ``nearest`` (default, SPHINX's replication)
            or ``bilinear`` (mmembed before issue #13; saved models that predate this argument load with it).
    """

    example_args = [
        {
            "encoders": [
                {"type": "timm", "name": "test_vit", "image_size": 32},
                {"type": "timm", "name": "test_vit", "image_size": 64},
            ]
        },
        {
            "encoders": [
                {"type": "timm", "name": "test_vit", "image_size": 64},
                {"type": "timm", "name": "test_resnet", "image_size": 64},
            ],
            "grid": "min",
        },
    ]
    #: values that a saved config written before the argument existed keeps (mmembed.io pins them on load)
    legacy_args = {"upsample": "bilinear"}

    def __init__(
        self, encoders: list[dict[str, Any]], grid: str | int | list[int] | None = "max", upsample: str = "nearest"
    ) -> None:
        super().__init__()
        self.check_config({"encoders": encoders, "grid": grid, "upsample": upsample}, prefix="model.vision.")
        self.encoders = nn.ModuleList([instantiate(VISION, dict(spec)) for spec in encoders])
        grids = [tuple(e.grid()) for e in self.encoders]
        for spec, g in zip(encoders, grids):
            if g[0] == 1 and g[1] > 1:  # tokens without a 2-D layout (the base class's (1, N) fallback)
                raise ConfigError(
                    "model.vision.encoders",
                    f"encoder {spec.get('type')}:{spec.get('name', '')} has a non-spatial token grid {g}; "
                    "allowed: encoders with a 2-D patch grid (ViTs, convnets)",
                )
        self._grid = _common_grid(grid, grids)
        self.upsample = upsample
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
        grid = args.get("grid", "max")
        if not _valid_grid(grid):
            raise ConfigError(
                f"{prefix}grid", f"got {grid!r}; allowed: max, min, a positive integer n, or [h, w] with positive sides"
            )
        upsample = args.get("upsample", "nearest")
        if upsample not in _UPSAMPLE:
            raise ConfigError(f"{prefix}upsample", f"got {upsample!r}; allowed: {', '.join(_UPSAMPLE)}")

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
        feats = [
            resample_grid(e(x), e.grid(), self._grid, self.upsample)
            for e, x in zip(self.encoders, self._inputs(pixel_values))
        ]
        return torch.cat(feats, dim=-1)

    def grid(self) -> tuple[int, int]:
        return self._grid

    def global_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, sum of the encoders' global widths): each encoder's own global feature, concatenated."""
        return torch.cat([e.global_feature(x) for e, x in zip(self.encoders, self._inputs(pixel_values))], dim=-1)

    def export_args(self) -> dict[str, Any]:
        specs = [{"type": e.registry_name, **e.export_args()} for e in self.encoders]
        return {"encoders": specs, "grid": list(self._grid), "upsample": self.upsample}


def _valid_grid(grid: Any) -> bool:
    if grid is None or grid in _GRID_MODES:
        return True
    if isinstance(grid, bool):
        return False
    if isinstance(grid, int):
        return grid >= 1
    return (
        isinstance(grid, (list, tuple))
        and len(grid) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in grid)
    )


def _common_grid(grid: str | int | list[int] | None, grids: list[tuple[int, int]]) -> tuple[int, int]:
    """The ``grid`` argument resolved against the encoders' grids (ties by token count: the first encoder's)."""
    if grid is None or grid == "max":
        return max(grids, key=lambda g: g[0] * g[1])
    if grid == "min":
        return min(grids, key=lambda g: g[0] * g[1])
    if isinstance(grid, int):
        return (grid, grid)
    return (int(grid[0]), int(grid[1]))
