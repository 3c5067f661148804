"""Qwen2-VL and Qwen2.5-VL as native embedding backbones (VLM2Vec-V2, GME), through the transformers classes.

The HF base model (``Qwen2VLModel`` / ``Qwen2_5_VLModel``: ViT with 2x2 patch merger + Qwen2 LLM with M-RoPE,
Qwen2-VL paper arXiv 2409.12191) runs its own forward on the ``Qwen2VLProcessor`` output; dynamic resolution is
bounded by ``min_pixels`` / ``max_pixels`` (VLM2Vec-V2: 28*28*4 .. 28*28*1280, ANCHORS.md §1.8); one visual
token covers 28x28 pixels. VLM2Vec pads Qwen on the left (ANCHORS.md §1.2).
"""

from __future__ import annotations

from typing import Any

import torch

from mmembed.backbones.native import TINY_TEXT_CONFIG, NativeVLM, from_config_or_name, load_hf_processor
from mmembed.registry import BACKBONES

__all__ = [
    "Qwen2VL",
    "build_tiny_qwen2vl_processor",
    "QWEN_SPECIAL_TOKENS",
    "TINY_QWEN2VL_CONFIG",
    "TINY_QWEN25VL_CONFIG",
]

QWEN_SPECIAL_TOKENS = ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"]
_CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}

#: A tiny random-init Qwen2-VL (hidden 64, 2+2 layers) whose special-token ids match the tiny processor.
TINY_QWEN2VL_CONFIG: dict[str, Any] = {
    "model_type": "qwen2_vl",
    "image_token_id": 400,
    "vision_start_token_id": 401,
    "vision_end_token_id": 402,
    "video_token_id": 403,
    "text_config": {
        **TINY_TEXT_CONFIG,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    },
    "vision_config": {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": 64,
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
}


#: Qwen2.5-VL twin: windowed ViT (``hidden_size`` is the ViT width, ``out_hidden_size`` the LLM's).
TINY_QWEN25VL_CONFIG: dict[str, Any] = {
    **TINY_QWEN2VL_CONFIG,
    "model_type": "qwen2_5_vl",
    "vision_config": {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "out_hidden_size": 64,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,
        "fullatt_block_indexes": [1],
    },
}


def build_tiny_qwen2vl_processor(min_pixels: int = 28 * 28 * 4, max_pixels: int = 28 * 28 * 16) -> Any:
    """An offline ``Qwen2VLProcessor``: mmembed's tiny tokenizer + the 4 Qwen vision tokens (ids 400-403)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    from mmembed.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.add_tokens(QWEN_SPECIAL_TOKENS, special_tokens=True)
    image = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    return Qwen2VLProcessor(image_processor=image, tokenizer=tok, video_processor=Qwen2VLVideoProcessor())


@BACKBONES.register("qwen2_vl")
class Qwen2VL(NativeVLM):
    """Qwen2-VL / Qwen2.5-VL (``model_type`` picks the class) with its own ViT, merger and processor.

    Args:
        name: hub id or local directory (HF format); weights, processor and tokenizer load from it. When set,
            ``config`` and a ``tiny`` processor are ignored, so ``model.backbone.name=...`` on a tiny recipe loads
            the real checkpoint with its own processor.
        config: a config dict with ``model_type`` ``qwen2_vl`` or ``qwen2_5_vl`` for random init (tiny recipes).
        pretrained: load weights from ``name``.
        processor: processor directory / hub id, or ``tiny`` (offline test processor); defaults to ``name``.
        min_pixels, max_pixels: Qwen's dynamic-resolution bounds per image (28x28 pixels per visual token).
        dtype: ``float32`` / ``bfloat16`` / ``float16``.
        attn_implementation: ``sdpa`` (default), ``eager`` or ``flash_attention_2``.
        add_eos: append the tokenizer's EOS (last-token pooling reads it).
    """

    supports_merge = True
    image_text = "<|vision_start|><|image_pad|><|vision_end|>"
    image_token = "<|image_pad|>"
    model_keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    example_args = [
        {"config": TINY_QWEN2VL_CONFIG, "processor": "tiny"},
        {"config": TINY_QWEN25VL_CONFIG, "processor": "tiny", "max_pixels": 28 * 28 * 8},
    ]

    def __init__(
        self,
        name: str | None = None,
        config: dict[str, Any] | None = None,
        pretrained: bool = True,
        processor: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        add_eos: bool = True,
    ) -> None:
        super().__init__()
        self.check_config({"min_pixels": min_pixels, "max_pixels": max_pixels})
        if name:  # a checkpoint wins over a tiny config left in the recipe (model.backbone.name=... override)
            from transformers import AutoConfig

            config, model_type = None, AutoConfig.from_pretrained(name).model_type
            processor = None if processor == "tiny" else processor
        elif config is not None:
            model_type = config.get("model_type", "qwen2_vl")
        else:
            raise ValueError("qwen2_vl needs 'name' (hub id or directory) or 'config'")
        if model_type not in _CLASSES:
            raise ValueError(f"qwen2_vl: model_type must be one of {', '.join(_CLASSES)}, got {model_type!r}")
        model = from_config_or_name(_CLASSES[model_type], name, config, pretrained, dtype, attn_implementation)
        spec = processor or name
        if spec is None:
            raise ValueError("qwen2_vl built from 'config' needs 'processor' (a directory, hub id or 'tiny')")
        proc = build_tiny_qwen2vl_processor() if spec == "tiny" else load_hf_processor(spec)
        size = dict(proc.image_processor.size)
        if min_pixels is not None:
            size["shortest_edge"] = int(min_pixels)
        if max_pixels is not None:
            size["longest_edge"] = int(max_pixels)
        self.check_config({"min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"]})
        proc.image_processor.size = type(proc.image_processor.size)(**size)
        self._setup(model, proc, add_eos, dtype, source=str(spec))

    @staticmethod
    def check_config(args: dict[str, Any]) -> None:
        from mmembed.config import ConfigError

        lo, hi = args.get("min_pixels"), args.get("max_pixels")
        for key, value in (("min_pixels", lo), ("max_pixels", hi)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(key, f"must be a positive integer (pixels), got {value!r}")
        if lo is not None and hi is not None and lo > hi:
            raise ConfigError("min_pixels", f"min_pixels={lo} is above max_pixels={hi}")

    def tokens_per_image(self) -> int:
        """Upper bound of visual tokens per image: ``max_pixels / (patch * merge)^2``."""
        ip = self.hf_processor.image_processor
        unit = int(ip.patch_size) * int(ip.merge_size)
        return max(1, int(ip.size["longest_edge"]) // (unit * unit))

    def forward_native(
        self, batch: dict[str, torch.Tensor], all_layers: bool = False, reducer: Any = None, uniform: bool = False
    ) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor]:
        """The HF forward; with a merge ``reducer`` and images, merged tokens with mmembed's M-RoPE positions.

        Merging path: ViT + merger (``get_image_features``) -> per-image merge -> (B, L', d) ``inputs_embeds``
        with (3, B, L') positions from :func:`~mmembed.backbones.qwen2_vl_merge.merge_visual_tokens` -> the
        model's forward (LLM only). Returns hidden states and the (B, L') mask they align with.
        """
        if reducer is None or batch.get("pixel_values") is None or batch["pixel_values"].shape[0] == 0:
            return super().forward_native(batch, all_layers=all_layers, uniform=uniform)
        embeds, mask, pos, _ = self.merged_inputs(batch, reducer)
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=pos,
            output_hidden_states=all_layers,
            use_cache=False,
        )
        return (tuple(out.hidden_states[1:]) if all_layers else out.last_hidden_state), mask

    def merged_inputs(
        self, batch: dict[str, torch.Tensor], reducer: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs_embeds (B, L', d), attention_mask (B, L'), position_ids (3, B, L'), source columns (B, L'))."""
        from mmembed.backbones.qwen2_vl_merge import merge_visual_tokens

        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        grid = batch["image_grid_thw"]
        pixels = batch["pixel_values"].to(self.model_dtype())
        feats = base.get_image_features(pixels, grid, return_dict=True).pooler_output  # per image (N_k, d)
        ids = batch["input_ids"]
        return merge_visual_tokens(
            self.embed(ids),
            ids,
            batch["attention_mask"],
            tuple(feats),
            grid,
            self.image_token_id,
            int(base.visual.spatial_merge_size),
            reducer,
        )
