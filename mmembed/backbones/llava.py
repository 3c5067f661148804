"""LLaVA (1.5) and LLaVA-Next (1.6) as native embedding backbones (VLM2Vec, E5-V), through the transformers classes.

The HF base model (``LlavaModel`` / ``LlavaNextModel``: CLIP or SigLIP tower -> MLP projector -> Llama/Mistral/
Qwen2 LLM, arXiv 2310.03744) runs its own forward on the ``LlavaProcessor`` / ``LlavaNextProcessor`` output.
LLaVA-Next's any-res tiling (``image_grid_pinpoints``) can be switched off (``anyres: false``): the image
processor then keeps one base-resolution tile (VLM2Vec's low-res setting).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmembed.backbones.native import (
    TINY_TEXT_CONFIG,
    ModuleRef,
    NativeVLM,
    load_hf_processor,
    load_native,
    set_image_backend,
)
from mmembed.backbones.splice import image_runs
from mmembed.registry import BACKBONES
from mmembed.tiny import TINY_CLIP_VISION_CONFIG, build_tiny_tokenizer
from mmembed.types import ConfigError, InputError
from mmembed.visual import VisualItem, line_positions

__all__ = ["Llava", "build_tiny_llava_processor", "TINY_LLAVA_CONFIG", "TINY_LLAVA_NEXT_CONFIG"]

_CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}

_TINY_TEXT = {"model_type": "qwen2", **TINY_TEXT_CONFIG}

#: A tiny random-init LLaVA: CLIP tower (32 px, 4x4 patches -> 16 visual tokens) + 2-layer Qwen2; ``<image>`` = 400.
TINY_LLAVA_CONFIG: dict[str, Any] = {
    "model_type": "llava",
    "image_token_id": 400,
    "vision_feature_select_strategy": "default",
    "vision_feature_layer": -2,
    "image_seq_length": 16,
    "vision_config": TINY_CLIP_VISION_CONFIG,
    "text_config": _TINY_TEXT,
}
_TINY_SIGLIP = {**TINY_LLAVA_CONFIG, "vision_feature_select_strategy": "full", "vision_feature_layer": -1}
_TINY_SIGLIP["vision_config"] = {**TINY_CLIP_VISION_CONFIG, "model_type": "siglip_vision_model"}
#: LLaVA-Next twin: any-res tiles on a 32 px base (up to 2x2 tiles + the overview, newline token per row).
TINY_LLAVA_NEXT_CONFIG: dict[str, Any] = {
    **TINY_LLAVA_CONFIG,
    "model_type": "llava_next",
    "image_grid_pinpoints": [[32, 32], [32, 64], [64, 32], [64, 64]],
}


def build_tiny_llava_processor(
    image_size: int = 32,
    patch_size: int = 8,
    strategy: str = "default",
    extra_tokens: int = 1,
    pinpoints: list[list[int]] | None = None,
) -> Any:
    """An offline ``LlavaProcessor`` (``LlavaNextProcessor`` with ``pinpoints``): mmembed's tiny tokenizer +
    ``<image>`` (id 400) + a CLIP-style image processor at ``image_size``."""
    from transformers import CLIPImageProcessor, LlavaNextImageProcessor, LlavaNextProcessor, LlavaProcessor

    tok = build_tiny_tokenizer()
    tok.add_tokens(["<image>"], special_tokens=True)
    sizes = {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size}}
    if pinpoints is not None:
        image = LlavaNextImageProcessor(**sizes, image_grid_pinpoints=pinpoints)
        cls = LlavaNextProcessor
    else:
        image, cls = CLIPImageProcessor(**sizes), LlavaProcessor
    return cls(
        image_processor=image,
        tokenizer=tok,
        patch_size=patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=extra_tokens,
        image_token="<image>",
    )


@BACKBONES.register("llava")
class Llava(NativeVLM):
    """LLaVA / LLaVA-Next (``model_type`` ``llava`` or ``llava_next`` picks the class) with its own tower.

    Args:
        name: hub id or local directory (HF format); weights, processor and tokenizer load from it. When set,
            ``config`` and a ``tiny`` processor are ignored (``model.backbone.name=...`` on a tiny recipe).
        config: a config dict with ``model_type`` for random init (tiny recipes).
        pretrained: load weights from ``name``.
        processor: processor directory / hub id, or ``tiny`` (offline test processor); defaults to ``name``.
        anyres: LLaVA-Next only: ``false`` keeps a single base-resolution tile per image (no any-res tiling).
        dtype: ``float32`` / ``bfloat16`` / ``float16``.
        attn_implementation: ``sdpa`` (default), ``eager`` or ``flash_attention_2``.
        add_eos: append the tokenizer's EOS (last-token pooling reads it).
        image_backend: ``pil`` | ``torchvision``: the image processor's backend (``None``: the processor's own).

    ``model.layout: vlm2vec`` (docs/mmeb.md): ``<image>`` then a space before the instruction, the tokenizer's BOS,
    no EOS (VLM2Vec's ``process_input_text`` and ``Llava_NEXT_process_fn``); positions are 1-D in both layouts.
    """

    image_text = "<image>"
    image_token = "<image>"
    model_keys = ("input_ids", "attention_mask", "pixel_values", "image_sizes")
    image_keys = ("image_sizes",)
    example_args = [
        {"config": TINY_LLAVA_CONFIG, "processor": "tiny"},
        {"config": _TINY_SIGLIP, "processor": "tiny-siglip"},
        {"config": TINY_LLAVA_NEXT_CONFIG, "processor": "tiny"},
        {"config": TINY_LLAVA_NEXT_CONFIG, "processor": "tiny", "anyres": False},
    ]

    def __init__(
        self,
        name: str | None = None,
        config: dict[str, Any] | None = None,
        pretrained: bool = True,
        processor: str | None = None,
        anyres: bool = True,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        add_eos: bool = True,
        image_backend: str | None = None,
    ) -> None:
        super().__init__()
        model, model_type, spec = load_native(
            "llava", _CLASSES, name, config, pretrained, processor, ("tiny", "tiny-siglip"), dtype, attn_implementation
        )
        if spec in ("tiny", "tiny-siglip"):
            vc = model.config.vision_config
            strategy = model.config.vision_feature_select_strategy
            extra = 1 if vc.model_type == "clip_vision_model" else 0
            pins = getattr(model.config, "image_grid_pinpoints", None) if model_type == "llava_next" else None
            proc = build_tiny_llava_processor(vc.image_size, vc.patch_size, strategy, extra, pins)
        else:
            proc = load_hf_processor(spec)
        self.anyres = anyres
        if not anyres and model_type == "llava_next":
            size = int(model.config.vision_config.image_size)
            model.config.image_grid_pinpoints = [[size, size]]
            proc.image_processor.image_grid_pinpoints = [[size, size]]
        set_image_backend(proc, image_backend)
        self._setup(model, proc, add_eos, dtype, source=str(spec))

    def tokens_per_image(self) -> int:
        """Visual tokens per base tile: (image_size / patch)^2, plus CLS with the ``full`` strategy."""
        vc = self.model.config.vision_config
        n = (int(vc.image_size) // int(vc.patch_size)) ** 2
        if self.model.config.vision_feature_select_strategy == "full" and vc.model_type == "clip_vision_model":
            n += 1
        return n

    # ------------------------------------------------------------------------------------------
    # connector swap (the HF forward stays in use when the connector keeps the token count)

    def _grid(self) -> tuple[int, int]:
        vc = self.base_model().config.vision_config
        g = int(vc.image_size) // int(vc.patch_size)
        return (g, g)

    def vision_tower(self) -> nn.Module:
        return self.base_model().vision_tower

    def connector_in_dim(self) -> int:
        """The projector's input width (the tower width, times the layers when several are concatenated)."""
        return int(self.base_model().multi_modal_projector.linear_1.in_features)

    def _install_connector(self, connector: nn.Module) -> bool:
        """``multi_modal_projector`` calls ``connector`` on each tile's (g*g, D_v) features (grid (g, g)).

        A connector that keeps the count (``mlp``) leaves the HF forward, its processor and LLaVA-Next's any-res
        packing as they are; one that changes it (``pool_adapter``, ``visual_table``) is spliced by mmembed,
        which needs LLaVA-1.5 (any-res packing assumes the tower's grid) and patch features without CLS."""
        base = self.base_model()
        g = self._grid()
        resized = connector.num_tokens(g) != g[0] * g[1]
        if resized:
            if base.config.model_type == "llava_next":
                raise ConfigError(
                    "model.connector",
                    f"llava_next packs any-res tiles on the tower's {g[0]}x{g[1]} grid, so the connector must keep "
                    f"the token count ({g[0] * g[1]} per tile; e.g. mlp), got {connector.num_tokens(g)}",
                )
            if self.tokens_per_image() != g[0] * g[1]:
                raise ConfigError(
                    "model.connector",
                    "a connector that changes the token count needs patch features without CLS "
                    "(model.backbone.config.vision_feature_select_strategy: default)",
                )
        base.multi_modal_projector = _ConnectorCall(connector, g)
        return resized

    def image_features(self, batch: dict[str, torch.Tensor], connector: nn.Module | None) -> list[torch.Tensor]:
        """Per image (N_k, d): LLaVA's per-image features, or LLaVA-Next's packed ones (tiles, unpadding and
        newline rows) cut at the processor's image-token runs. A swapped ``connector`` already sits in the
        projector's place (:meth:`_install_connector`)."""
        kw = {"image_sizes": batch["image_sizes"]} if batch.get("image_sizes") is not None else {}
        pixels = batch["pixel_values"].to(self.model_dtype())
        feats = self.base_model().get_image_features(pixel_values=pixels, **kw, return_dict=True).pooler_output
        if isinstance(feats, (list, tuple)):
            return list(feats)
        if "input_ids" not in batch:  # one image (the blank of ``blank_visual``)
            return [feats]
        sizes = [e - s for _, s, e in image_runs(batch["input_ids"], self.image_token_id)]
        if sum(sizes) != feats.shape[0]:
            raise InputError(f"{sum(sizes)} image tokens in the batch but {feats.shape[0]} image features")
        return list(feats.split(sizes))

    def image_items(self, batch: dict[str, torch.Tensor], connector: nn.Module | None) -> list[VisualItem]:
        """1-D RoPE: each image's tokens take the next positions in order."""
        feats = self.image_features(batch, connector)
        return [VisualItem(f, line_positions(f.shape[0], f.device), f.shape[0]) for f in feats]


class _ConnectorCall(nn.Module):
    """Stands in for ``multi_modal_projector``: calls the connector the embedding model owns through a
    :class:`ModuleRef` (so its weights are saved, trained and sharded once, as ``connector.*``, outside peft's
    frozen base model)."""

    def __init__(self, connector: nn.Module, grid: tuple[int, int]) -> None:
        super().__init__()
        self.target = ModuleRef(connector)
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N_tiles, N, D_v) -> (N_tiles, N', d)."""
        param = next(self.target.module.parameters())
        return self.target(x.to(param.dtype), self.grid)
