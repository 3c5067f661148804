"""Connectors: vision tokens (B, N, D_v) -> LLM-width tokens (B, N', d). See base.py for the contract."""

from __future__ import annotations

from mmembed.connectors import mlp  # noqa: F401  (registration)
from mmembed.connectors.base import Connector

__all__ = ["Connector"]
