"""AIM's full recipe as one reducer: merge each image's tokens before the LLM, then prune inside it.

Zhong et al., "AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning", ICCV 2025,
arXiv 2412.03248; LaVi-Lab/AIM. ALGORITHMS.md §5a + §5b.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmembed.registry import REDUCERS
from mmembed.tokens.merge import MergeReducer
from mmembed.tokens.prune import PruneReducer

__all__ = ["AIMReducer"]


@REDUCERS.register("aim")
class AIMReducer(nn.Module):
    """``merge`` (``keep_ratio``) before the LLM and ``prune`` (``schedule`` / ``start_layer`` / ``step``) inside it.

    Args: those of :class:`~mmembed.tokens.merge.MergeReducer` and :class:`~mmembed.tokens.prune.PruneReducer`.
    """

    pre_llm = True
    in_llm = True
    example_args = [{}, {"keep_ratio": 0.5, "schedule": [1.0, 0.5]}]

    def __init__(
        self,
        dim: int = 0,
        num_layers: int = 1,
        keep_ratio: float = 0.25,
        schedule: list[float] | None = None,
        start_layer: int | None = None,
        step: float = 0.125,
        temperature: float = 0.1,
        iterations: int = 5,
    ) -> None:
        super().__init__()
        self.merge = MergeReducer(dim, num_layers, keep_ratio)
        self.prune = PruneReducer(dim, num_layers, schedule, start_layer, step, temperature, iterations)
        self.keep_ratios = self.prune.keep_ratios

    @staticmethod
    def check_config(args: dict[str, Any], prefix: str = "") -> None:
        MergeReducer.check_config({k: v for k, v in args.items() if k == "keep_ratio"}, prefix)
        PruneReducer.check_config({k: v for k, v in args.items() if k != "keep_ratio"}, prefix)

    def num_tokens(self, n: int) -> int:
        return self.merge.num_tokens(n)

    def reduce(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.merge.reduce(tokens)

    def importance(self, q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.prune.importance(q, k, allowed, valid)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.merge(tokens)
