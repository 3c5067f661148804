"""Token merging before the LLM: AIM's modified ToMe bipartite soft matching, per image.

Zhong et al., "AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning", ICCV 2025,
arXiv 2412.03248; LaVi-Lab/AIM ``llava/model/token_merge.py``. Bolya et al., "Token Merging" (ToMe),
arXiv 2210.09461. docs/algorithms.md §5a.

One step, on x (n, t, c): cosine similarity between even-index sources A and odd-index destinations B;
each source's best destination; the ``r`` most similar sources are averaged into their destination
(unweighted mean, ``scatter_reduce(mean, include_self=True)``), the rest kept. Steps repeat with
``r <= t // 2`` until ``round(keep_ratio * N)`` tokens remain, so the output count depends only on N.
Unlike the reference (which emits ``[A_unmerged; B]``), the survivors are put back in their original
(raster) order; :meth:`Merger.reduce` also returns each survivor's original index.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmembed.registry import MERGERS
from mmembed.types import ConfigError

__all__ = ["Merger", "AIMMerger", "merge_step", "merge_tokens", "merged_count"]


def merged_count(n: int, keep_ratio: float) -> int:
    """Tokens left from ``n`` at ``keep_ratio`` (at least 1)."""
    return max(1, min(n, int(round(n * keep_ratio))))


def merge_step(x: torch.Tensor, pos: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One bipartite soft-matching step: (n, t, c), positions (n, t) -> (n, t - r, c), (n, t - r)."""
    n, t, c = x.shape
    r = min(r, t // 2)
    if r <= 0:
        return x, pos
    metric = F.normalize(x.float(), dim=-1)
    a, b = metric[:, 0::2], metric[:, 1::2]
    best, dst_idx = (a @ b.transpose(1, 2)).max(dim=-1)  # (n, t_a)
    order = best.argsort(dim=-1, descending=True, stable=True)
    src, unm = order[:, :r], order[:, r:]  # merged / kept sources
    xa, xb = x[:, 0::2], x[:, 1::2]
    pa, pb = pos[:, 0::2], pos[:, 1::2]
    src_x = xa.gather(1, src[..., None].expand(-1, -1, c))
    dst = dst_idx.gather(1, src)  # (n, r)
    xb = xb.scatter_reduce(1, dst[..., None].expand(-1, -1, c), src_x, reduce="mean", include_self=True)
    out_x = torch.cat([xa.gather(1, unm[..., None].expand(-1, -1, c)), xb], dim=1)
    out_p = torch.cat([pa.gather(1, unm), pb], dim=1)
    keep = out_p.argsort(dim=1)  # back to the original (raster) order
    return out_x.gather(1, keep[..., None].expand(-1, -1, c)), out_p.gather(1, keep)


def merge_tokens(x: torch.Tensor, keep_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge (n, t, c) down to ``merged_count(t, keep_ratio)`` tokens per image; also return original indices."""
    n, t, _ = x.shape
    pos = torch.arange(t, device=x.device).expand(n, t)
    target = merged_count(t, keep_ratio)
    while x.shape[1] > target:
        x, pos = merge_step(x, pos, min(x.shape[1] - target, x.shape[1] // 2))
    return x, pos


class Merger(nn.Module):
    """The merging contract: fewer visual tokens per image, before the LLM (after the connector).

    ``reduce(tokens (N_img, N, d)) -> (merged (N_img, N', d), index (N_img, N'))`` with each survivor's original
    index (in raster order), which backbones with 2-D / M-RoPE positions need; ``num_tokens(N) -> N'`` depends on
    N only, so the processor can expand each image placeholder before anything runs.
    """

    def num_tokens(self, n: int) -> int:
        raise NotImplementedError

    def reduce(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.reduce(tokens)[0]


@MERGERS.register("aim")
class AIMMerger(Merger):
    """AIM's merging: each image's tokens to ``keep_ratio`` of their count (AIM default 0.25).

    In the composed ``hf_causal_lm`` model positions are numbered over the spliced sequence, so the survivors (kept
    in raster order) take consecutive 1-D positions, like any shorter image run; Qwen2-VL's survivors keep the
    M-RoPE (t, h, w) of their original cell.

    Args:
        keep_ratio: fraction of tokens kept, in (0, 1].
    """

    example_args = [{}, {"keep_ratio": 0.5}, {"keep_ratio": 1.0}]

    def __init__(self, keep_ratio: float = 0.25) -> None:
        super().__init__()
        self.check_config({"keep_ratio": keep_ratio}, prefix="model.merge.")
        self.keep_ratio = float(keep_ratio)

    @staticmethod
    def check_config(args: dict[str, Any], prefix: str = "") -> None:
        r = args.get("keep_ratio", 0.25)
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < float(r) <= 1.0:
            raise ConfigError(f"{prefix}keep_ratio", f"must be in (0, 1], got {r!r}")

    def num_tokens(self, n: int) -> int:
        return merged_count(n, self.keep_ratio)

    def reduce(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N_img, N, d) -> merged (N_img, N', d) and original indices (N_img, N')."""
        return merge_tokens(tokens, self.keep_ratio)
