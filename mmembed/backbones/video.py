"""Video input for native VLM backbones: what a backbone declares so its HF video path gets mmembed's frames.

The native processor (:class:`~mmembed.processing.NativeProcessor`) samples and decodes each video with
:func:`mmembed.video.load_video` (deterministic, docs/video.md) and hands the frames to the model's own HF processor
with ``do_sample_frames=False`` (:func:`~mmembed.processing.native.hf_video_kwargs`); the HF forward then embeds them
through the model's own video path:

- Qwen2-VL / Qwen2.5-VL / Qwen3-VL: ``pixel_values_videos`` (N_patches, C*T*P*P) flattened patches with
  ``video_grid_thw`` (N_vid, 3), the video token ``<|video_pad|>`` inside ``<|vision_start|>...<|vision_end|>``
  (transformers ``models/qwen2_vl/video_processing_qwen2_vl.py``, ``Qwen2VLModel.get_video_features``); M-RoPE
  positions from ``get_rope_index`` with ``mm_token_type_ids`` 2 on video tokens; Qwen2.5-VL adds
  ``second_per_grid_ts`` (N_vid,), Qwen3-VL a ``<t seconds>`` text before each frame pair
  (``Qwen3VLProcessor.replace_video_token``, from the ``video_metadata`` indices and rate).
- LLaVA-OneVision: ``pixel_values_videos`` (N_vid, T, 3, S, S), each frame's tower features 2x2 bilinearly pooled,
  one ``image_newline`` after the video (``LlavaOnevisionModel.get_video_features``).

Videos go through the stock visual path only: a connector swap, a merger or a pruner acts on images, so a video
batch under one of them is refused (:func:`check_stock`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mmembed.types import ConfigError, InputError

__all__ = ["QWEN_VIDEO_KEYS", "VideoBackbone", "video_options", "check_video_config", "check_stock"]

#: Qwen's per-video HF inputs (``second_per_grid_ts`` only from Qwen2.5-VL's processor)
QWEN_VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def video_options(mapping: Mapping[str, Any] | None, defaults: Mapping[str, Any] | None = None) -> Any:
    """:class:`~mmembed.video.VideoOptions` from a recipe's ``model.backbone.video`` mapping on top of the model's
    ``defaults`` (e.g. Qwen's ``factor`` = patch * merge); an unknown key raises ``ConfigError("video", ...)``
    naming it."""
    from mmembed.video import VideoOptions

    if mapping is not None and not isinstance(mapping, Mapping):
        raise ConfigError("video", f"expected a mapping of video options, got {type(mapping).__name__}")
    try:
        return VideoOptions.from_mapping({**dict(defaults or {}), **dict(mapping or {})})
    except (TypeError, ValueError) as e:
        raise ConfigError("video", str(e)) from None


def check_video_config(args: Mapping[str, Any]) -> None:
    """Recipe validation of ``model.backbone.video`` (before anything is built)."""
    video_options(args.get("video"))


def check_stock(batch: dict[str, torch.Tensor], stock: bool) -> None:
    """Refuse a batch with videos on a visual path that mmembed splices (connector swap, merger, pruner)."""
    if not stock and batch.get("pixel_values_videos") is not None:
        raise InputError(
            "video rows need the model's own visual path: model.connector, model.merge and model.prune act on "
            "images only (leave them out to embed videos)"
        )


class VideoBackbone:
    """What a native backbone with a video path declares (mixed into :class:`~mmembed.backbones.native.NativeVLM`).

    Attributes: ``video_text`` (the HF processor's text per video), ``video_token`` (the token it expands),
    ``video_keys`` / ``video_grid_key`` (per-video batch tensors, as ``image_keys`` / ``patch_grid_key``),
    ``video_options`` (set by :meth:`_setup_video`), ``video_token_id``.
    """

    video_text: str | None = None
    video_token: str | None = None
    video_keys: tuple[str, ...] = ()
    video_grid_key: str | None = None
    video_options: Any = None
    video_token_id: int | None = None

    def _setup_video(self, video: Mapping[str, Any] | None, defaults: Mapping[str, Any] | None = None) -> None:
        """Options from the recipe on top of ``defaults``; the model's video token id, checked against the
        processor's tokenizer (as the image token is)."""
        self.video_options = video_options(video, defaults)
        model, tok = self.model, self.tokenizer  # type: ignore[attr-defined]
        token = getattr(self.hf_processor, "video_token", None) or self.video_token  # type: ignore[attr-defined]
        model_id = int(model.config.video_token_id)
        tok_id = tok.convert_tokens_to_ids(token)
        if tok_id is None or int(tok_id) != model_id:
            raise ConfigError(
                "model.backbone.config.video_token_id",
                f"the model's video_token_id is {model_id} but the processor's tokenizer maps {token!r} to {tok_id}",
            )
        self.video_token_id = model_id

    def tokens_per_video(self) -> int:
        """Visual tokens per video, an estimate for length grouping: ``max_frames`` (8 when unset) frames."""
        frames = self.video_options.max_frames or 8 if self.video_options is not None else 8
        return self.tokens_per_frame() * int(frames)

    def tokens_per_frame(self) -> int:
        """Visual tokens one sampled frame adds (an estimate)."""
        return int(self.tokens_per_image())  # type: ignore[attr-defined]
