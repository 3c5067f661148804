"""LLaVA (1.5) and LLaVA-Next (1.6) as native embedding backbones (VLM2Vec, E5-V), through the transformers classes.

The HF base model (``LlavaModel`` / ``LlavaNextModel``: CLIP or SigLIP tower -> MLP projector -> Llama/Mistral/
Qwen2 LLM, arXiv 2310.03744) runs its own forward on the ``LlavaProcessor`` / ``LlavaNextProcessor`` output.
LLaVA-Next's any-res tiling (``image_grid_pinpoints``) can be switched off (``anyres: false``): the image
processor then keeps one base-resolution tile (VLM2Vec's low-res setting, ANCHORS.md §1.8 and §1.11).
"""

from __future__ import annotations

from typing import Any

from mmembed.backbones.native import TINY_TEXT_CONFIG, NativeVLM, from_config_or_name, load_hf_processor
from mmembed.registry import BACKBONES

__all__ = ["Llava", "build_tiny_llava_processor", "TINY_LLAVA_CONFIG", "TINY_LLAVA_NEXT_CONFIG"]

_CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}

_TINY_TEXT = {"model_type": "qwen2", **TINY_TEXT_CONFIG}
_TINY_CLIP = {
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}

#: A tiny random-init LLaVA: CLIP tower (32 px, 4x4 patches -> 16 visual tokens) + 2-layer Qwen2; ``<image>`` = 400.
TINY_LLAVA_CONFIG: dict[str, Any] = {
    "model_type": "llava",
    "image_token_id": 400,
    "vision_feature_select_strategy": "default",
    "vision_feature_layer": -2,
    "image_seq_length": 16,
    "vision_config": _TINY_CLIP,
    "text_config": _TINY_TEXT,
}
_TINY_SIGLIP = {**TINY_LLAVA_CONFIG, "vision_feature_select_strategy": "full", "vision_feature_layer": -1}
_TINY_SIGLIP["vision_config"] = {**_TINY_CLIP, "model_type": "siglip_vision_model"}
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

    from mmembed.tiny import build_tiny_tokenizer

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
    """

    image_text = "<image>"
    image_token = "<image>"
    model_keys = ("input_ids", "attention_mask", "pixel_values", "image_sizes")
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
    ) -> None:
        super().__init__()
        if name:  # a checkpoint wins over a tiny config left in the recipe (model.backbone.name=... override)
            from transformers import AutoConfig

            config, model_type = None, AutoConfig.from_pretrained(name).model_type
            processor = None if processor in ("tiny", "tiny-siglip") else processor
        elif config is not None:
            model_type = config.get("model_type", "llava")
        else:
            raise ValueError("llava needs 'name' (hub id or directory) or 'config'")
        if model_type not in _CLASSES:
            raise ValueError(f"llava: model_type must be one of {', '.join(_CLASSES)}, got {model_type!r}")
        model = from_config_or_name(_CLASSES[model_type], name, config, pretrained, dtype, attn_implementation)
        spec = processor or name
        if spec is None:
            raise ValueError("llava built from 'config' needs 'processor' (a directory, hub id or 'tiny')")
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
        self._setup(model, proc, add_eos, dtype, source=str(spec))

    def tokens_per_image(self) -> int:
        """Visual tokens per base tile: (image_size / patch)^2, plus CLS with the ``full`` strategy."""
        vc = self.model.config.vision_config
        n = (int(vc.image_size) // int(vc.patch_size)) ** 2
        if self.model.config.vision_feature_select_strategy == "full" and vc.model_type == "clip_vision_model":
            n += 1
        return n
