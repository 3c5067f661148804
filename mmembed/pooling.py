"""Poolers: hidden states (B, L, d) -> one vector per input (B, d).

Last-token pooling follows VLM2Vec's padding-aware rule (docs/algorithms.md §6.3); mean pooling can
skip instruction tokens as LLM2Vec ``skip_instruction`` / NV-Embed ``pool_mask`` do (§6.4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmembed.registry import POOLERS
from mmembed.types import ConfigError

__all__ = [
    "Pooler",
    "LastTokenPooler",
    "MeanPooler",
    "LatentAttentionPooler",
    "MultiLayerPooler",
    "last_token_index",
    "masked_mean",
]


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


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor, fallback: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L, d) averaged over ``mask`` (B, L); rows with an empty mask use ``fallback`` (B, L) instead."""
    if fallback is not None:
        mask = torch.where(mask.sum(dim=1, keepdim=True) == 0, fallback, mask)
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


class _GEGLUFeedForward(nn.Module):
    """``Linear(d, 2*m*d) -> x * GELU(gate) -> Linear(m*d, d)`` (NV-Embed / Perceiver feed-forward)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 2 * mult * dim)
        self.down = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.up(self.norm(x)).chunk(2, dim=-1)
        return self.down(a * F.gelu(gate))


class _CrossAttention(nn.Module):
    """Multi-head cross-attention ``q (B, Lq, d)`` over ``kv (B, Lk, d)`` with LayerNorm on both (SDPA)."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, lq, _ = q.shape
        lk = kv.shape[1]
        qh = self.to_q(self.norm_q(q)).view(b, lq, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.to_kv(self.norm_kv(kv)).view(b, lk, 2, self.heads, self.head_dim).unbind(2)
        mask = None if key_mask is None else key_mask.bool()[:, None, None, :]  # (B, 1, 1, Lk)
        out = F.scaled_dot_product_attention(qh, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return self.to_out(out.transpose(1, 2).reshape(b, lq, -1))


@POOLERS.register("latent_attention")
class LatentAttentionPooler(Pooler):
    """NV-Embed latent-attention pooling: tokens attend to a trainable latent array, then MLP and masked mean.

    Lee et al., "NV-Embed", arXiv 2405.17428; ``nvidia/NV-Embed-v2`` ``modeling_nvembed.py`` (docs/algorithms.md §6.1).
    ``O = H + MHA(q=LN(H), k=v=LN(Latents))``; ``O = O + FF(LN(O))`` (GEGLU); masked mean of O over ``pool_mask``.
    The latents are a dictionary: no mask is needed on the keys. Defaults are small (NV-Embed: 512 latents,
    8 heads of width 4096); set ``num_latents``/``num_heads``/``head_dim`` for the paper's sizes.

    Args:
        dim: backbone width d (injected).
        num_latents: rows of the latent array r.
        num_heads: attention heads.
        head_dim: per-head width (defaults to ``dim // num_heads``).
        skip_instruction: average over ``pool_mask`` (instruction excluded) rather than ``attention_mask``.
    """

    example_args = [{}, {"num_latents": 4, "num_heads": 2, "head_dim": 8, "skip_instruction": False}]

    def __init__(
        self,
        dim: int,
        num_latents: int = 64,
        num_heads: int = 4,
        head_dim: int | None = None,
        skip_instruction: bool = True,
    ) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))  # N(0, 1) as NV-Embed
        self.attn = _CrossAttention(dim, num_heads, head_dim or max(1, dim // num_heads))
        self.ff = _GEGLUFeedForward(dim)
        self.skip_instruction = skip_instruction

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, d) -> (B, d)."""
        lat = self.latents.to(hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)  # (B, r, d)
        out = hidden + self.attn(hidden, lat)
        out = out + self.ff(out)
        mask = pool_mask if self.skip_instruction else attention_mask
        return masked_mean(out, mask, attention_mask)


@POOLERS.register("multi_layer")
class MultiLayerPooler(Pooler):
    """Multi-layers trainable pooling: learned latents cross-attend over one vector per layer.

    Tang & Yang, "Pooling And Attention: What Are Effective Designs For LLM-Based Embedding Models?",
    arXiv 2409.02727; ``PoolingAndAttn:pooling_layers/*`` (docs/algorithms.md §6.2). Per layer l the last-token
    (``per_layer: last``, causal) or masked-mean (``mean``, bidirectional) vector, plus a layer embedding, gives
    X (B, N_L, d); latents (r, d) attend to X (LayerNorm on both), residual, GEGLU FF with residual, mean over
    latents. Defaults are small (paper: 768 latents, 32 heads of 2048).

    Args:
        dim: backbone width d (injected).
        num_layers: decoder layers N_L (injected).
        per_layer: ``last`` or ``mean``.
        num_latents, num_heads, head_dim: attention sizes.
    """

    needs_all_layers = True
    example_args = [{}, {"per_layer": "mean", "num_latents": 2, "num_heads": 2}]

    def __init__(
        self,
        dim: int,
        num_layers: int,
        per_layer: str = "last",
        num_latents: int = 8,
        num_heads: int = 4,
        head_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.check_config({"per_layer": per_layer})
        self.per_layer = per_layer
        self.layer_embed = nn.Embedding(num_layers, dim)
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.attn = _CrossAttention(dim, num_heads, head_dim or max(1, dim // num_heads))
        self.ff = _GEGLUFeedForward(dim)

    @staticmethod
    def check_config(args: dict) -> None:
        if args.get("per_layer", "last") not in ("last", "mean"):
            raise ConfigError("per_layer", f"got {args.get('per_layer')!r}; allowed: last, mean")

    def forward(
        self, hidden: tuple[torch.Tensor, ...], attention_mask: torch.Tensor, pool_mask: torch.Tensor
    ) -> torch.Tensor:
        """A tuple of N_L (B, L, d) layer outputs -> (B, d)."""
        stack = torch.stack(tuple(hidden), dim=1)  # (B, N_L, L, d)
        b = stack.shape[0]
        if self.per_layer == "last":
            idx = last_token_index(attention_mask)
            x = stack[torch.arange(b, device=stack.device), :, idx]  # (B, N_L, d)
        else:
            m = torch.where(pool_mask.sum(1, keepdim=True) == 0, attention_mask, pool_mask).to(stack.dtype)
            x = (stack * m[:, None, :, None]).sum(2) / m.sum(1).clamp_min(1.0)[:, None, None]
        x = x + self.layer_embed.weight[: x.shape[1]].to(x.dtype)
        lat = self.latents.to(x.dtype).unsqueeze(0).expand(b, -1, -1)  # (B, r, d)
        lat = lat + self.attn(lat, x)
        lat = lat + self.ff(lat)
        return lat.mean(dim=1)
