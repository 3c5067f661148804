"""NoteLLM-2 late fusion: a gate mixing the pooled text-side vector with a projected global image feature.

Zhang et al., "NoteLLM-2: Multimodal Large Representation Models for Recommendation", KDD 2025, arXiv 2405.16789;
Applied-Machine-Learning-Lab/NoteLLM ``code/model/Gate.py``. docs/algorithms.md §4.

``v = W_lf g`` (g: the image's CLS/global feature, no bias), ``z = sigmoid(W_g [n; v])`` (no bias, Xavier-normal),
``n~ = z * v + (1 - z) * n``. Rows without an image pass ``n`` through unchanged. The same gate is applied to the
mICL visual representation (see :meth:`mmembed.model.EmbeddingModel.forward_with_aux`).
"""

from __future__ import annotations

import torch
from torch import nn

from mmembed.registry import FUSIONS
from mmembed.types import ConfigError

__all__ = ["LateFusion"]


@FUSIONS.register("late_fusion")
class LateFusion(nn.Module):
    """``forward(text_rep (B, d), image_global (B, D_v), has_image (B,) bool) -> (B, d)``.

    Args:
        dim: pooled width d (injected).
        vision_dim: global image feature width D_v (injected).
        micl_token: the mICL compression token (e.g. ``<IMG_EMB>``); when set it is added to the tokenizer and
            the model also returns the vision-only representation: the hidden state just before that token.
        micl_weight: the vision loss weight w_v relative to ``1 - micl_weight`` for the main loss (NoteLLM-2:
            9:1, i.e. 0.1); read by the training loss, not used here.
    """

    example_args = [{}, {"micl_token": "<IMG_EMB>", "micl_weight": 0.25}]

    def __init__(self, dim: int, vision_dim: int, micl_token: str | None = None, micl_weight: float = 0.1) -> None:
        super().__init__()
        self.proj = nn.Linear(vision_dim, dim, bias=False)  # W_lf
        self.gate = nn.Linear(2 * dim, dim, bias=False)  # W_g
        nn.init.xavier_normal_(self.gate.weight)
        self.micl_token, self.micl_weight = micl_token, float(micl_weight)
        self.micl_token_id: int | None = None  # set by the model builder

    @staticmethod
    def check_config(args: dict) -> None:
        w = args.get("micl_weight", 0.1)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= float(w) < 1.0:
            raise ConfigError("micl_weight", f"must be in [0, 1), got {w!r}")

    def gate_values(self, text_rep: torch.Tensor, image_global: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, d) and the projected image feature v (B, d)."""
        v = self.proj(image_global.to(self.proj.weight.dtype)).to(text_rep.dtype)
        z = torch.sigmoid(self.gate(torch.cat([text_rep, v], dim=-1)))
        return z, v

    def forward(
        self, text_rep: torch.Tensor, image_global: torch.Tensor, has_image: torch.Tensor | None = None
    ) -> torch.Tensor:
        z, v = self.gate_values(text_rep, image_global)
        fused = z * v + (1 - z) * text_rep
        if has_image is None:
            return fused
        return torch.where(has_image.bool()[:, None], fused, text_rep)
