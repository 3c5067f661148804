"""The connector contract."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Connector"]


class Connector(nn.Module):
    """Maps vision tokens to the LLM's input width.

    ``forward(tokens (B, N, D_v), grid (h, w)) -> (B, N', d)`` and ``num_tokens(grid) -> N'``; the
    processor asks :meth:`num_tokens` how many placeholder rows each image expands to.
    """

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError

    def num_tokens(self, grid: tuple[int, int]) -> int:
        raise NotImplementedError

    def out_grid(self, grid: tuple[int, int]) -> tuple[int, int] | None:
        """The (h', w') grid the output tokens form in raster order, or ``None`` when they form none (then
        backbones with 2-D positions, Qwen2-VL's M-RoPE, number them in a line). Default: the input grid when
        the count is unchanged."""
        return grid if self.num_tokens(grid) == grid[0] * grid[1] else None
