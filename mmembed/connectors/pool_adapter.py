"""InfMLLM pool-adapter: average-pool the patch grid to p x p, then project (position kept, raster order).

Zhou et al., "InfMLLM: A Unified Framework for Visual-Language Tasks", arXiv 2311.06791;
mightyzau/InfMLLM ``infmllm/models/pooler.py``. docs/algorithms.md §2.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmembed.connectors.base import Connector
from mmembed.registry import CONNECTORS
from mmembed.types import ConfigError

__all__ = ["PoolAdapter", "pool_grid"]

_MODES = ("exact", "adaptive")


def pool_grid(tokens: torch.Tensor, grid: tuple[int, int], p: int, mode: str = "exact") -> torch.Tensor:
    """(B, h*w, D) raster tokens -> (B, p*p, D) average-pooled raster tokens.

    ``exact`` uses non-overlapping kernels ``k = h / p`` (p must divide h and w); ``adaptive`` uses
    ``adaptive_avg_pool2d`` (uneven bins, any p <= grid).
    """
    b, n, d = tokens.shape
    h, w = grid
    x = tokens.transpose(1, 2).reshape(b, d, h, w)  # (B, D, h, w)
    if mode == "exact":
        if h % p or w % p:
            raise ValueError(f"pool_size {p} does not divide the grid {h}x{w} in exact mode")
        x = F.avg_pool2d(x, kernel_size=(h // p, w // p))
    else:
        x = F.adaptive_avg_pool2d(x, (p, p))
    return x.flatten(2).transpose(1, 2)  # (B, p*p, D), row-major


@CONNECTORS.register("pool_adapter")
class PoolAdapter(Connector):
    """Pool-then-project (InfMLLM order): ``pool(grid) -> Linear(D_v, d) -> GELU -> Linear(d, d)``.

    Args:
        in_dim: vision width D_v (injected).
        out_dim: LLM width d (injected).
        pool_size: output side p; each image becomes p*p tokens.
        mode: ``exact`` (integer kernels; p must divide the grid, as the reference) or ``adaptive``.
        hidden_dim: MLP hidden width (defaults to ``out_dim``).
    """

    example_args = [{"pool_size": 2}, {"pool_size": 3, "mode": "adaptive"}]

    def __init__(
        self, in_dim: int, out_dim: int, pool_size: int = 8, mode: str = "exact", hidden_dim: int | None = None
    ) -> None:
        super().__init__()
        self.check_config({"pool_size": pool_size, "mode": mode})
        self.pool_size, self.mode = int(pool_size), mode
        hidden = hidden_dim or out_dim
        self.proj = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    @staticmethod
    def check_config(args: dict[str, Any]) -> None:
        mode = args.get("mode", "exact")
        if mode not in _MODES:
            raise ConfigError("mode", f"got {mode!r}; allowed: {', '.join(_MODES)}")
        p = args.get("pool_size", 8)
        if not isinstance(p, int) or isinstance(p, bool) or p < 1:
            raise ConfigError("pool_size", f"must be a positive integer, got {p!r}")

    def check_grid(self, grid: tuple[int, int]) -> None:
        """Raise :class:`ConfigError` naming ``model.connector.pool_size`` if p does not fit ``grid``."""
        h, w = grid
        if self.mode == "exact" and (h % self.pool_size or w % self.pool_size):
            ok = [p for p in range(1, min(h, w) + 1) if h % p == 0 and w % p == 0]
            raise ConfigError(
                "model.connector.pool_size",
                f"{self.pool_size} does not divide the vision grid {h}x{w} in exact mode; allowed: "
                f"{', '.join(map(str, ok))} (or mode: adaptive)",
            )
        if self.pool_size > min(h, w):
            raise ConfigError("model.connector.pool_size", f"{self.pool_size} is larger than the grid {h}x{w}")

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, h*w, D_v) -> (B, p*p, d)."""
        return self.proj(pool_grid(tokens, grid, self.pool_size, self.mode))

    def num_tokens(self, grid: tuple[int, int]) -> int:
        self.check_grid(grid)
        return self.pool_size * self.pool_size

    def out_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        return (self.pool_size, self.pool_size)
