"""LLaVA-OneVision as a native embedding backbone, through the transformers classes.

The HF base model (``LlavaOnevisionModel``, transformers ``models/llava_onevision/modeling_llava_onevision.py``;
Li et al., "LLaVA-OneVision: Easy Visual Task Transfer", arXiv 2408.03326) is LLaVA-Next's layout with a SigLIP
tower and a Qwen2 LLM: each image is the base-resolution overview plus any-res tiles (``image_grid_pinpoints``),
tiles unpadded to the image's aspect ratio, bilinearly shrunk when they exceed ``anyres_max_N`` base tiles
(``vision_aspect_ratio``), and a learned ``image_newline`` row closing every tile row (``pack_image_features``). The
``LlavaOnevisionProcessor`` expands each ``<image>`` to exactly that count, so the stock path is the HF forward on its
output, and mmembed's splice (connector swap, AIM merging and pruning) cuts the packed features at the image runs as
for LLaVA-Next (:class:`~mmembed.backbones.llava.Llava`); positions are 1-D. Videos go through the model's own
video path (``pixel_values_videos`` (N_vid, T, 3, S, S): each frame's tower features 2x2 bilinearly pooled, then one
``image_newline``; :mod:`mmembed.backbones.video`); the videos of one batch must have the same frame count.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmembed.backbones.llava import _TINY_TEXT, Llava
from mmembed.backbones.native import load_hf_processor, load_native, set_image_backend
from mmembed.backbones.video import check_video_config
from mmembed.registry import BACKBONES
from mmembed.tiny import TINY_CLIP_VISION_CONFIG, build_tiny_tokenizer
from mmembed.types import ConfigError

__all__ = ["LlavaOnevision", "build_tiny_llava_onevision_processor", "TINY_LLAVA_ONEVISION_CONFIG"]

_CLASSES = {"llava_onevision": "LlavaOnevisionForConditionalGeneration"}

#: A tiny random-init LLaVA-OneVision: SigLIP tower (32 px, 8 px patches -> 16 tokens per tile, no CLS, ``full``
#: strategy as the checkpoints), any-res up to 2x2 tiles, ``anyres_max_1`` so that 2+ tiles are shrunk back to about
#: one tile's worth of tokens (the interpolation branch of ``pack_image_features``), 2-layer Qwen2; ``<image>`` = 400.
TINY_LLAVA_ONEVISION_CONFIG: dict[str, Any] = {
    "model_type": "llava_onevision",
    "image_token_index": 400,
    "video_token_index": 401,
    "vision_feature_select_strategy": "full",
    "vision_feature_layer": -1,
    "vision_aspect_ratio": "anyres_max_1",
    "image_grid_pinpoints": [[32, 32], [32, 64], [64, 32], [64, 64]],
    "vision_config": {**TINY_CLIP_VISION_CONFIG, "model_type": "siglip_vision_model", "vision_use_head": False},
    "text_config": _TINY_TEXT,
}


def build_tiny_llava_onevision_processor(
    image_size: int = 32,
    patch_size: int = 8,
    pinpoints: list[list[int]] | None = None,
    strategy: str = "full",
    aspect_ratio: str = "anyres_max_1",
) -> Any:
    """An offline ``LlavaOnevisionProcessor``: mmembed's tiny tokenizer + ``<image>`` (400) and ``<video>`` (401),
    an image processor at ``image_size`` with the model's ``pinpoints`` (SigLIP normalization: mean = std = 0.5)."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    tok = build_tiny_tokenizer()
    tok.add_tokens(["<image>", "<video>"], special_tokens=True)
    norm = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    size = {"height": image_size, "width": image_size}
    pins = pinpoints or [[image_size, image_size]]
    image = LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pins, **norm)
    video = LlavaOnevisionVideoProcessor(size=size, **norm)
    return LlavaOnevisionProcessor(
        image_processor=image,
        tokenizer=tok,
        video_processor=video,
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy=strategy,
        vision_aspect_ratio=aspect_ratio,
    )


@BACKBONES.register("llava_onevision")
class LlavaOnevision(Llava):
    """LLaVA-OneVision with its own SigLIP tower, projector, ``image_newline`` and processor.

    Args:
        name: hub id or local directory (HF format, e.g. ``llava-hf/llava-onevision-qwen2-0.5b-ov-hf``); weights,
            processor and tokenizer load from it. When set, ``config`` and a ``tiny`` processor are ignored.
        config: a config dict with ``model_type: llava_onevision`` for random init (tiny recipes).
        pretrained: load weights from ``name``.
        processor: processor directory / hub id, or ``tiny`` (offline test processor); defaults to ``name``.
        anyres: ``false`` keeps one base-resolution tile (plus the overview) per image.
        dtype: ``float32`` / ``bfloat16`` / ``float16``.
        attn_implementation: ``sdpa`` (default), ``eager`` or ``flash_attention_2``.
        add_eos: append the tokenizer's EOS (last-token pooling reads it).
        image_backend: ``pil`` | ``torchvision``: the image processor's backend (``None``: the processor's own).
        video: video options (docs/video.md): sampling; the video processor resizes every frame to the tower's size.

    Only ``model.layout: mmembed``. The HF processor sees the batch's images as one flat list, so every image is
    tiled (``batch_num_images`` all 1, the processor's and the model's reading alike).
    """

    layouts = ("mmembed",)
    model_keys = ("input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images")
    model_keys += ("pixel_values_videos",)
    #: per image (the flat image list): split with the images by GradCache
    image_keys = ("image_sizes", "batch_num_images")
    video_text = "<video>"
    video_token = "<video>"
    example_args = [
        {"config": TINY_LLAVA_ONEVISION_CONFIG, "processor": "tiny"},
        {"config": TINY_LLAVA_ONEVISION_CONFIG, "processor": "tiny", "anyres": False},
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
        video: dict[str, Any] | None = None,
    ) -> None:
        nn.Module.__init__(self)
        check_video_config({"video": video})
        model, _, spec = load_native(
            "llava_onevision", _CLASSES, name, config, pretrained, processor, ("tiny",), dtype, attn_implementation
        )
        cfg = model.config
        if spec == "tiny":
            vc = cfg.vision_config
            proc = build_tiny_llava_onevision_processor(
                int(vc.image_size),
                int(vc.patch_size),
                [list(p) for p in cfg.image_grid_pinpoints],
                cfg.vision_feature_select_strategy,
                cfg.vision_aspect_ratio,
            )
        else:
            proc = load_hf_processor(spec)
        self.anyres = anyres
        if not anyres:
            size = int(cfg.vision_config.image_size)
            cfg.image_grid_pinpoints = [[size, size]]
            proc.image_processor.image_grid_pinpoints = [[size, size]]
        set_image_backend(proc, image_backend)
        self._setup(model, proc, add_eos, dtype, source=str(spec))
        self._setup_video(video)

    check_config = staticmethod(check_video_config)

    def tokens_per_frame(self) -> int:
        """Tokens per video frame: the tower's g x g grid bilinearly pooled to ceil(g/2)^2 (``apply_pooling``)."""
        g = self._grid()[0]
        return ((g + 1) // 2) ** 2

    def _install_connector(self, connector: nn.Module) -> bool:
        """LLaVA's swap (``multi_modal_projector`` calls the connector per tile); the any-res packing reshapes
        each tile's features on the tower's grid, so the connector must keep the token count (e.g. ``mlp``)."""
        g = self._grid()
        if connector.num_tokens(g) != g[0] * g[1]:
            raise ConfigError(
                "model.connector",
                f"llava_onevision packs any-res tiles on the tower's {g[0]}x{g[1]} grid, so the connector must keep "
                f"the token count ({g[0] * g[1]} per tile; e.g. mlp), got {connector.num_tokens(g)}",
            )
        return super()._install_connector(connector)

    def image_features(self, batch: dict[str, torch.Tensor], connector: nn.Module | None) -> list[torch.Tensor]:
        """Per image (N_k, d): the packed features (overview, unpadded tiles with ``image_newline`` rows)."""
        kw = {k: batch[k] for k in ("image_sizes", "batch_num_images") if batch.get(k) is not None}
        pixels = batch["pixel_values"].to(self.model_dtype())
        out = self.base_model().get_image_features(pixel_values=pixels, **kw, return_dict=True)
        return list(out.pooler_output)
