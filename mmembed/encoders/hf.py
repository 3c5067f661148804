"""transformers CLIP and SigLIP vision towers.

Radford et al. 2021 (CLIP), Zhai et al. 2023 (SigLIP); classes from huggingface/transformers.
"""

from __future__ import annotations

from typing import Any

import torch

from mmembed.encoders.base import VisionEncoder
from mmembed.images import ImageTransform
from mmembed.registry import VISION
from mmembed.tiny import TINY_CLIP_VISION_CONFIG

__all__ = ["HFVisionEncoder"]

_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@VISION.register("hf")
class HFVisionEncoder(VisionEncoder):
    """A transformers vision tower (``CLIPVisionModel``, ``SiglipVisionModel``, ...).

    Args:
        name: hub id or local directory of a CLIP/SigLIP model (vision part used).
        config: a vision config dict with ``model_type`` (``clip_vision_model``, ``siglip_vision_model``)
            for random init without any download; wins over ``name``.
        pretrained: load weights from ``name``.
        layer: hidden-state index; ``-1`` the last layer, ``-2`` the penultimate (LLaVA).
        drop_cls: drop the class token when the tower has one (CLIP).
        trust_remote_code: passed to transformers; off by default.
    """

    example_args = [
        {"config": TINY_CLIP_VISION_CONFIG, "layer": -2},
        {"config": {**TINY_CLIP_VISION_CONFIG, "model_type": "siglip_vision_model"}},
    ]

    def __init__(
        self,
        name: str | None = None,
        config: dict[str, Any] | None = None,
        pretrained: bool = True,
        layer: int = -1,
        drop_cls: bool = True,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if config is not None:
            cfg_dict = dict(config)
            cfg = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
            self.model = AutoModel.from_config(cfg, attn_implementation="sdpa")
        elif name:
            cfg = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
            cfg = getattr(cfg, "vision_config", cfg)
            if pretrained:
                self.model = AutoModel.from_pretrained(
                    name, config=cfg, trust_remote_code=trust_remote_code, attn_implementation="sdpa"
                )
            else:
                self.model = AutoModel.from_config(cfg, attn_implementation="sdpa")
        else:
            raise ValueError("hf vision encoder needs 'name' or 'config'")
        cfg = self.model.config
        self.layer, self.drop_cls = layer, drop_cls
        self.has_cls = "clip" in cfg.model_type and drop_cls
        self.image_size = int(cfg.image_size)
        side = self.image_size // int(cfg.patch_size)
        self._grid = (side, side)
        self.out_dim = int(cfg.hidden_size)
        siglip = "siglip" in cfg.model_type
        mean, std = ((0.5,) * 3, (0.5,) * 3) if siglip else (_CLIP_MEAN, _CLIP_STD)
        self.transform = ImageTransform(self.image_size, mean, std, "bicubic", "squash" if siglip else "shortest")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.layer == -1:
            x = self.model(pixel_values=pixel_values).last_hidden_state
        else:
            x = self.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[self.layer]
        return x[:, 1:] if self.has_cls else x

    def grid(self) -> tuple[int, int]:
        return self._grid

    def global_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).pooler_output

    def export_args(self) -> dict[str, Any]:
        cfg = self.model.config.to_dict()
        keep = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("transformers_version",)}
        return {"config": keep, "layer": self.layer, "drop_cls": self.drop_cls}
