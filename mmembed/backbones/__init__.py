"""Language / vision-language backbones behind one contract (see base.py)."""

from __future__ import annotations

from mmembed.backbones import hf_causal_lm, llava, llava_onevision, qwen2_vl, qwen3_vl  # noqa: F401  (registration)
from mmembed.backbones.base import Backbone

__all__ = ["Backbone"]
