"""The one internal sample type every reader produces and every collator consumes (defined in mmembed.types)."""

from __future__ import annotations

from mmembed.types import ImageRef, Sample, Side

__all__ = ["ImageRef", "Side", "Sample"]
