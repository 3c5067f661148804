"""timm vision encoders (any ``timm.create_model`` name; ViTs and convnets).

Ross Wightman, PyTorch Image Models, https://github.com/huggingface/pytorch-image-models.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from mmembed.encoders.base import VisionEncoder, tokens_from_feature_map
from mmembed.images import ImageTransform
from mmembed.registry import VISION

__all__ = ["TimmEncoder"]


@VISION.register("timm")
class TimmEncoder(VisionEncoder):
    """A timm model's patch tokens.

    Args:
        name: timm model name, e.g. ``vit_base_patch16_224`` or ``test_vit``.
        pretrained: load timm's pretrained weights (downloads; off for offline builds).
        image_size: input side in pixels; defaults to the model's own.
        layer: which block's output to use; ``-1`` is the final (normed) features, ``-2`` the
            penultimate block as LLaVA uses (docs/algorithms.md §1).
        model_kwargs: extra ``timm.create_model`` arguments (e.g. ``depth``, ``embed_dim``).
        checkpoint_path: optional local weights file for timm to load (safetensors preferred).
    """

    # tiny offline settings for the registry contract test
    example_args = [{"name": "test_vit", "image_size": 32}, {"name": "test_resnet", "image_size": 64, "layer": -1}]

    def __init__(
        self,
        name: str,
        pretrained: bool = False,
        image_size: int | None = None,
        layer: int = -1,
        model_kwargs: dict[str, Any] | None = None,
        checkpoint_path: str | None = None,
    ) -> None:
        super().__init__()
        import timm

        kwargs = dict(model_kwargs or {}, pretrained=pretrained, num_classes=0, checkpoint_path=checkpoint_path or "")
        try:  # ViTs take the input size (their position embeddings depend on it); convnets do not
            self.model = timm.create_model(name, **kwargs, **({"img_size": image_size} if image_size else {}))
        except TypeError:
            self.model = timm.create_model(name, **kwargs)
        self.layer = layer
        self.num_prefix = int(getattr(self.model, "num_prefix_tokens", 0))
        cfg = timm.data.resolve_data_config({}, model=self.model)
        pe = getattr(self.model, "patch_embed", None)
        model_size = getattr(pe, "img_size", None)
        size = image_size or (model_size[0] if model_size else cfg["input_size"][-1])
        self.image_size = int(size)
        self.transform = ImageTransform(
            size=self.image_size,
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            interpolation=cfg.get("interpolation", "bicubic"),
        )
        self.out_dim = int(self.model.num_features)
        probe = self._probe()
        grid = getattr(pe, "grid_size", None)
        n = probe.shape[1]
        self._grid = tuple(int(g) for g in grid) if grid and grid[0] * grid[1] == n else _square(n)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.layer == -1:
            x = self.model.forward_features(pixel_values)
        else:
            n_blocks = len(getattr(self.model, "blocks", []) or getattr(self.model, "stages", []))
            idx = self.layer % n_blocks if n_blocks else self.layer
            x = self.model.forward_intermediates(
                pixel_values, indices=[idx], intermediates_only=True, output_fmt="NCHW"
            )[0]
            return tokens_from_feature_map(x)
        x = tokens_from_feature_map(x)
        return x[:, self.num_prefix :] if x.ndim == 3 and self.num_prefix else x

    @torch.no_grad()
    def _probe(self) -> torch.Tensor:
        """The (1, N, D) tokens of one blank image: the grid of any architecture from one dry run.

        When loading a saved model the parameters sit on the meta device while buffers (batch-norm
        statistics, position indices) are still real; a throwaway copy moved wholly to meta runs
        the dry run without touching either.
        """
        x = torch.zeros(1, 3, self.image_size, self.image_size)
        if next(self.model.parameters()).device.type != "meta":
            return self.forward(x)
        real, self.model = self.model, copy.deepcopy(self.model).to("meta")
        try:
            return self.forward(x.to("meta"))
        finally:
            self.model = real

    def grid(self) -> tuple[int, int]:
        return self._grid

    def global_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(pixel_values), pre_logits=True)


def _square(n: int) -> tuple[int, int]:
    side = int(round(n**0.5))
    return (side, side) if side * side == n else (1, n)
