"""Ovis visual embedding table: probabilities over a visual vocabulary, embedding = probability-weighted rows.

Lu et al., "Ovis: Structural Embedding Alignment for Multimodal Large Language Model", arXiv 2405.20797;
AIDC-AI/Ovis ``ovis/model/visual_tokenizer/base_visual_tokenizer.py`` and ``modeling_ovis.py``. docs/algorithms.md §3.

Per patch r_i: ``logits_i = LayerNorm(W r_i)`` (W without bias, LayerNorm over the K - 2 atom ids),
``p_i = softmax(logits_i)`` in fp32 (or hard Gumbel-softmax / straight-through argmax), ``v_i = p_i^T E`` with
E (K, d). Straight-through argmax follows Ovis's ``st_argmax`` as ``BaseVisualTokenizer.tokenize`` calls it
(``ovis/model/visual_tokenizer/base_visual_tokenizer.py``): applied to the raw logits, so the forward value is the
one-hot of the argmax and the gradient reaches the logits unchanged (identity), not through a softmax.

The last two ids are the image begin/end indicators: each image becomes ``[E[K-2]; v_1..v_n; E[K-1]]``, so
:meth:`VisualTable.num_tokens` is ``n + 2`` and the processor's placeholder run already holds the indicator rows.
Optional ``hidden_stride`` s concatenates s x s neighbours (space-to-depth, grid zero-padded to a multiple of s)
before the head.

Memory: without gradients, images are processed one at a time, so at most one image's (n, K) probabilities exist.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmembed.connectors.base import Connector
from mmembed.registry import CONNECTORS
from mmembed.types import ConfigError

__all__ = ["VisualTable", "space_to_depth", "straight_through_argmax"]

_TOKENIZE = ("softmax", "gumbel", "st")
N_INDICATORS = 2


def space_to_depth(tokens: torch.Tensor, grid: tuple[int, int], s: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, h*w, D) -> (B, ceil(h/s)*ceil(w/s), D*s*s), zero-padding the grid to a multiple of s."""
    if s == 1:
        return tokens, grid
    b, _, d = tokens.shape
    h, w = grid
    x = tokens.reshape(b, h, w, d)
    ph, pw = -h % s, -w % s
    x = F.pad(x, (0, 0, 0, pw, 0, ph))  # pad w then h
    hh, ww = (h + ph) // s, (w + pw) // s
    x = x.reshape(b, hh, s, ww, s, d).permute(0, 1, 3, 2, 4, 5).reshape(b, hh * ww, s * s * d)
    return x, (hh, ww)


def straight_through_argmax(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) logits -> (..., V) one-hot of the argmax whose gradient w.r.t. ``logits`` is the identity.

    Ovis ``BaseVisualTokenizer.tokenize`` (``tokenize_function="st_argmax"``) computes
    ``one_hot - logits.detach() + logits`` on the head's logits (its inner function names them ``y_soft`` but is
    called with the logits). With gradients off the exact one-hot is returned (the expression can differ from it by
    a rounding error in the hot entry), so every inference row is exactly a table row.
    """
    hard = F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(logits.dtype)
    if not torch.is_grad_enabled():
        return hard
    return hard - logits.detach() + logits


@CONNECTORS.register("visual_table")
class VisualTable(Connector):
    """Visual tokenizer head + visual embedding table (VET), with begin/end indicator rows.

    Args:
        in_dim: vision width D_v (injected).
        out_dim: LLM width d (injected).
        vocab_size: K, including the 2 indicator ids (Ovis2.5: 65536; v1 scripts 131072).
        tokenize: ``softmax`` (default, as every released Ovis script), ``gumbel`` (hard Gumbel-softmax with
            ``tau`` in training; straight-through argmax in eval) or ``st`` (straight-through argmax on the logits,
            Ovis's ``st_argmax``: :func:`straight_through_argmax`).
        tau: Gumbel temperature (Ovis anneals 5.0 -> 0.05; set it from the training loop).
        hidden_stride: space-to-depth stride s (1 = off).
        init_std: std of the N(0, std) table init (Ovis: 1.0; use the LLM embedding std to match its scale).
    """

    example_args = [
        {"vocab_size": 64},
        {"vocab_size": 32, "tokenize": "st", "hidden_stride": 3},
        {"vocab_size": 32, "tokenize": "gumbel", "tau": 0.5},
    ]

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        vocab_size: int = 8192,
        tokenize: str = "softmax",
        tau: float = 1.0,
        hidden_stride: int = 1,
        init_std: float = 1.0,
    ) -> None:
        super().__init__()
        self.check_config({"vocab_size": vocab_size, "tokenize": tokenize, "hidden_stride": hidden_stride, "tau": tau})
        self.vocab_size, self.tokenize, self.tau, self.stride = vocab_size, tokenize, float(tau), hidden_stride
        atoms = vocab_size - N_INDICATORS
        self.head = nn.Linear(in_dim * hidden_stride * hidden_stride, atoms, bias=False)
        self.head_norm = nn.LayerNorm(atoms)
        self.table = nn.Parameter(torch.randn(vocab_size, out_dim) * init_std)  # E (K, d)

    @staticmethod
    def check_config(args: dict[str, Any]) -> None:
        if args.get("tokenize", "softmax") not in _TOKENIZE:
            raise ConfigError("tokenize", f"got {args.get('tokenize')!r}; allowed: {', '.join(_TOKENIZE)}")
        k = args.get("vocab_size", 8192)
        if not isinstance(k, int) or k <= N_INDICATORS + 1:
            raise ConfigError("vocab_size", f"must be an integer > {N_INDICATORS + 1}, got {k!r}")
        s = args.get("hidden_stride", 1)
        if not isinstance(s, int) or s < 1:
            raise ConfigError("hidden_stride", f"must be an integer >= 1, got {s!r}")
        if float(args.get("tau", 1.0)) <= 0:
            raise ConfigError("tau", "must be > 0")

    def probabilities(self, feats: torch.Tensor) -> torch.Tensor:
        """(..., D_v*s*s) -> (..., K-2) distribution over the atom ids (one-hot for ``st``/``gumbel``)."""
        logits = self.head_norm(self.head(feats)).float()
        if self.tokenize == "gumbel" and self.training:
            return F.gumbel_softmax(logits, tau=self.tau, hard=True)
        if self.tokenize == "softmax":
            return logits.softmax(dim=-1)
        return straight_through_argmax(logits)

    def embed_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """(..., K-2) or (..., K) probabilities -> (..., d) = p^T E (indicator columns are zero for atoms)."""
        table = self.table[: probs.shape[-1]]
        return (probs.to(table.dtype) @ table).to(self.table.dtype)

    def indicators(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Begin and end rows, (B, 1, d) each."""
        e = self.table[-N_INDICATORS:]
        return e[0].expand(batch, 1, -1), e[1].expand(batch, 1, -1)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, h*w, D_v) -> (B, n + 2, d) with n = ceil(h/s) * ceil(w/s)."""
        feats, _ = space_to_depth(tokens, grid, self.stride)
        if torch.is_grad_enabled():
            atoms = self.embed_probs(self.probabilities(feats))
        else:  # one image at a time: never more than one (n, K) probability matrix
            atoms = torch.cat([self.embed_probs(self.probabilities(f[None])) for f in feats], dim=0)
        begin, end = self.indicators(tokens.shape[0])
        return torch.cat([begin, atoms.to(begin.dtype), end], dim=1)

    def num_tokens(self, grid: tuple[int, int]) -> int:
        h, w = grid
        s = self.stride
        return -(-h // s) * -(-w // s) + N_INDICATORS
