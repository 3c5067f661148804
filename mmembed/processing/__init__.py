"""Processors: rows -> one padded batch, one family per kind of backbone (shared base in :mod:`.base`).

``make_processor(backbone, visual, cfg)`` picks the family the backbone names (``backbone.processor``):
``composed`` (:class:`Processor`: mmembed tokenizes, expands each placeholder to the visual path's count and
transforms the images) or ``hf`` (:class:`NativeProcessor`: the native VLM's own HF processor does both).
"""

from __future__ import annotations

from typing import Any

from mmembed.processing.base import BaseProcessor
from mmembed.processing.composed import Processor
from mmembed.processing.native import NativeProcessor, video_args
from mmembed.types import InputError, layout_side

__all__ = ["BaseProcessor", "Processor", "NativeProcessor", "InputError", "layout_side", "make_processor"]


def _composed(backbone: Any, visual: Any, cfg: Any) -> Processor:
    return Processor(
        tokenizer=backbone.tokenizer,
        placeholder=cfg.image_placeholder,
        placeholder_id=backbone.add_image_token(cfg.image_placeholder),
        image_tokens=visual.num_tokens() if visual is not None else 0,
        transform=visual.transform if visual is not None else None,
        max_length=cfg.max_length,
        padding_side=cfg.padding_side,
        add_eos=backbone.add_eos,
        max_pixels=cfg.max_pixels,
        max_images=cfg.max_images_per_input,
    )


def _hf(backbone: Any, visual: Any, cfg: Any) -> NativeProcessor:
    return NativeProcessor(
        backbone.hf_processor,
        image_text=backbone.inline_text,
        lead_text=backbone.lead_text,
        text_positions=backbone.text_positions,
        join_as_vlm2vec=backbone.layout == "vlm2vec",
        image_token_id=backbone.image_token_id,
        placeholder=cfg.image_placeholder,
        image_tokens=backbone.tokens_per_image(),
        padding_side=cfg.padding_side,
        add_eos=backbone.add_eos,
        max_pixels=cfg.max_pixels,
        max_images=cfg.max_images_per_input,
        max_length=cfg.max_length,
        image_keys=backbone.image_keys,
        patch_grid_key=backbone.patch_grid_key,
        **video_args(backbone),
    )


FAMILIES = {"composed": _composed, "hf": _hf}


def make_processor(backbone: Any, visual: Any, cfg: Any) -> BaseProcessor:
    """The processor of a model with this ``backbone``, visual path and :class:`~mmembed.config.ModelCfg`."""
    return FAMILIES[backbone.processor](backbone, visual, cfg)
