"""Evaluation: the MMEB protocol (each query ranked against its own candidates) and retrieval metrics."""

from __future__ import annotations

from mmembed.eval.protocol import evaluate, hit_at_1

__all__ = ["evaluate", "hit_at_1"]
