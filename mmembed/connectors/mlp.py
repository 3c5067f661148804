"""LLaVA-1.5 MLP projector (``mlp{depth}x_gelu``).

Liu et al., "Improved Baselines with Visual Instruction Tuning" (LLaVA-1.5), arXiv 2310.03744;
haotian-liu/LLaVA ``llava/model/multimodal_projector/builder.py``. docs/algorithms.md §1.
"""

from __future__ import annotations

import torch
from torch import nn

from mmembed.connectors.base import Connector
from mmembed.registry import CONNECTORS
from mmembed.types import ConfigError

__all__ = ["MLPConnector"]


@CONNECTORS.register("mlp")
class MLPConnector(Connector):
    """``Linear(D_v, d)`` followed by ``depth - 1`` x ``[GELU, Linear(d, d)]``; token count unchanged.

    Args:
        in_dim: vision width D_v (injected).
        out_dim: LLM width d (injected).
        depth: number of Linear layers; 1 is LLaVA-1's linear projector, 2 is LLaVA-1.5's default.
        hidden_dim: width of the hidden layers (defaults to ``out_dim``, as in LLaVA).
    """

    example_args = [{}, {"depth": 1}, {"depth": 3, "hidden_dim": 48}]

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2, hidden_dim: int | None = None) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        hidden = hidden_dim or out_dim
        dims = [in_dim] + [hidden] * (depth - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(depth):
            if i:
                layers.append(nn.GELU())  # exact erf GELU, as LLaVA
            layers.append(nn.Linear(dims[i], dims[i + 1]))
        self.proj = nn.Sequential(*layers)

    @staticmethod
    def check_config(args: dict) -> None:
        if int(args.get("depth", 2)) < 1:
            raise ConfigError("depth", f"must be >= 1, got {args.get('depth')}")

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, N, D_v) -> (B, N, d)."""
        return self.proj(tokens)

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return grid[0] * grid[1]
