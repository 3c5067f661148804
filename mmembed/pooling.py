"""Poolers: hidden states (B, L, d) -> one vector per input (B, d).

Last-token pooling follows VLM2Vec's padding-aware rule (ALGORITHMS.md §6.3); mean pooling can
skip instruction tokens as LLM2Vec ``skip_instruction`` / NV-Embed ``pool_mask`` do (§6.4).
"""

from __future__ import annotations

import torch
from torch import nn

from mmembed.registry import POOLERS

__all__ = ["Pooler", "LastTokenPooler", "MeanPooler", "last_token_index"]


class Pooler(nn.Module):
    """``forward(hidden (B, L, d), attention_mask (B, L), pool_mask (B, L)) -> (B, d)``.

    ``pool_mask`` is ``attention_mask`` with the instruction tokens zeroed. A pooler that needs every
    layer sets ``needs_all_layers = True`` and then receives a tuple of (B, L, d) tensors.
    """

    needs_all_layers = False

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, correct for left and right padding alike: (B,)."""
    length = attention_mask.shape[1]
    flipped_first = attention_mask.flip(1).to(torch.int64).argmax(dim=1)  # first 1 from the right
    return length - 1 - flipped_first


@POOLERS.register("last_token")
class LastTokenPooler(Pooler):
    """The hidden state of the last non-pad token (the appended EOS): VLM2Vec ``pooling=last/eos``."""

    example_args = [{}]

    def __init__(self, dim: int) -> None:
        super().__init__()

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        idx = last_token_index(attention_mask)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]


@POOLERS.register("mean")
class MeanPooler(Pooler):
    """Masked mean over tokens; ``skip_instruction`` leaves the instruction tokens out (LLM2Vec, NV-Embed).

    Rows whose pool mask is empty (only an instruction) fall back to all real tokens.
    """

    example_args = [{}, {"skip_instruction": False}]

    def __init__(self, dim: int, skip_instruction: bool = True) -> None:
        super().__init__()
        self.skip_instruction = skip_instruction

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        mask = pool_mask if self.skip_instruction else attention_mask
        empty = mask.sum(dim=1, keepdim=True) == 0
        mask = torch.where(empty, attention_mask, mask).to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
