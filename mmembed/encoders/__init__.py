"""Vision encoders: timm, open_clip and transformers towers behind one contract (see base.py), and ``multi``."""

from __future__ import annotations

from mmembed.encoders import hf, multi, open_clip_encoder, timm_encoder  # noqa: F401  (registration)
from mmembed.encoders.base import VisionEncoder

__all__ = ["VisionEncoder"]
