"""Connectors: vision tokens (B, N, D_v) -> LLM-width tokens (B, N', d). See base.py for the contract.

``late_fusion`` (a fusion, registered in ``FUSIONS``) lives here too so it registers with the connectors.
"""

from __future__ import annotations

from mmembed.connectors import late_fusion, mlp, pool_adapter, visual_table  # noqa: F401  (registration)
from mmembed.connectors.base import Connector

__all__ = ["Connector"]
