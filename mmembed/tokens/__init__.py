"""Token reduction before and inside the LLM (ALGORITHMS.md §5)."""

from __future__ import annotations
