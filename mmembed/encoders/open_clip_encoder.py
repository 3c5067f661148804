"""open_clip image towers (any open_clip architecture name, or a custom ``vision_cfg``).

Ilharco et al., OpenCLIP, https://github.com/mlfoundations/open_clip.
"""

from __future__ import annotations

from typing import Any

import torch

from mmembed.encoders.base import VisionEncoder
from mmembed.images import ImageTransform
from mmembed.registry import VISION

__all__ = ["OpenClipEncoder"]


@VISION.register("open_clip")
class OpenClipEncoder(VisionEncoder):
    """The patch tokens of an open_clip ``VisionTransformer``.

    Args:
        name: open_clip architecture (``ViT-B-32``); ignored when ``vision_cfg`` is given.
        pretrained: an open_clip pretrained tag (``laion2b_s34b_b79k``) or a local checkpoint path; ``None``
            or ``False`` for random init.
        vision_cfg: a custom ``CLIPVisionCfg`` dict (tiny test towers).
        embed_dim: the joint embedding width for a custom tower (only its ``global_feature`` uses it).
        layer: ``-1`` for the final tokens (after ``ln_post``), else the index of a transformer block.
    """

    example_args = [
        {
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
            "embed_dim": 32,
        },
        {"vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8}, "layer": -2},
    ]

    def __init__(
        self,
        name: str | None = None,
        pretrained: str | bool | None = None,
        vision_cfg: dict[str, Any] | None = None,
        embed_dim: int = 512,
        layer: int = -1,
    ) -> None:
        super().__init__()
        import open_clip

        if vision_cfg is not None:
            from open_clip.model import _build_vision_tower

            self.visual = _build_vision_tower(embed_dim, vision_cfg)
            pp = {"mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD}
            pp["interpolation"], pp["size"] = "bicubic", self.visual.image_size
        elif name:
            tag = pretrained if isinstance(pretrained, str) else None
            model = open_clip.create_model(name, pretrained=tag)
            self.visual = model.visual
            pp = open_clip.get_model_preprocess_cfg(model)
            del model  # drop the text tower
        else:
            raise ValueError("open_clip encoder needs 'name' or 'vision_cfg'")
        if not hasattr(self.visual, "forward_intermediates") or not hasattr(self.visual, "grid_size"):
            raise ValueError(f"open_clip tower {type(self.visual).__name__} has no patch tokens; use a ViT tower")
        size = pp["size"]
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.transform = ImageTransform(
            size=self.image_size,
            mean=tuple(pp["mean"]),
            std=tuple(pp["std"]),
            interpolation=pp.get("interpolation", "bicubic"),
        )
        self.layer = layer
        self.visual.output_tokens = True
        self.out_dim = int(self.visual.transformer.width)
        self._grid = tuple(int(g) for g in self.visual.grid_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.layer == -1:
            _, tokens = self.visual(pixel_values)
            return tokens
        n = len(self.visual.transformer.resblocks)
        out = self.visual.forward_intermediates(
            pixel_values, indices=[self.layer % n], intermediates_only=True, output_fmt="NLC"
        )
        return out["image_intermediates"][0]

    def grid(self) -> tuple[int, int]:
        return self._grid

    def global_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.visual(pixel_values)
        return pooled
