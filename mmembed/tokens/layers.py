"""What :func:`~mmembed.tokens.prune.pruned_forward` needs from an HF decoder to run it layer by layer.

Each layer's attention mask, rotary embedding and attention logits are rebuilt the way the family's own forward
builds them (transformers 5, ``masking_utils`` and ``models/{qwen2,mistral,gemma2,gemma3}/modeling_*.py``):

- **layer types**: ``config.layer_types`` (Qwen2/Qwen3/Qwen2-VL with ``use_sliding_window``, Gemma 2/3) says
  ``sliding_attention`` or ``full_attention`` per layer; without it (Mistral, Phi-3) ``config.sliding_window``,
  if set, applies to every layer; Llama and Gemma have no window.
- **sliding window** w: key j is visible from query i iff ``i - w < j <= i`` (``sliding_window_overlay``), on
  sequence *indices* (not position ids), i.e. the original indices of gathered rows.
- **bidirectional**: Gemma 3's ``use_bidirectional_attention`` makes full layers padding-only and sliding layers
  ``|i - j| < w``; a backbone run bidirectionally (``hf_causal_lm``, ``attention: bidirectional``) hands every layer
  one padding-only mask, so no window applies.
- **rotary**: Gemma 3 has one rotary table per layer type (local vs global rope theta), ``rotary_emb(x, pos,
  layer_type)``.
- **logits**: ``q k^T * scaling`` (``attn.scaling``: ``d_h^-1/2``, Gemma 2/3 ``query_pre_attn_scalar^-1/2``), then
  Gemma 2's ``softcap * tanh(. / softcap)``.
"""

from __future__ import annotations

import inspect
import sys

import torch
from torch import nn

from mmembed.types import ConfigError

__all__ = ["layer_types", "layer_windows", "allowed_mask", "layer_mask", "LayerRotary", "layer_qk", "logit_args"]

_KNOWN_TYPES = ("full_attention", "sliding_attention")


def layer_types(config: object, n_layers: int) -> list[str]:
    """Per-layer attention type, ``full_attention`` or ``sliding_attention``; other types are refused."""
    types = getattr(config, "layer_types", None)
    if types is None:
        kind = "full_attention" if getattr(config, "sliding_window", None) is None else "sliding_attention"
        return [kind] * n_layers
    types = list(types)[:n_layers]
    bad = sorted({t for t in types if t not in _KNOWN_TYPES})
    if bad:
        raise ConfigError(
            "model.prune",
            f"token pruning cannot run the {getattr(config, 'model_type', '?')} layer type(s) {', '.join(bad)}; "
            f"allowed: {', '.join(_KNOWN_TYPES)}",
        )
    return types


def layer_windows(config: object, n_layers: int) -> list[int | None]:
    """Per-layer sliding window (``None``: full attention), as the family's forward applies it."""
    window = getattr(config, "sliding_window", None)
    return [window if t == "sliding_attention" else None for t in layer_types(config, n_layers)]


def allowed_mask(
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    key_ok: torch.Tensor,
    causal: bool,
    window: int | None,
) -> torch.Tensor:
    """(B, 1, Lq, Lk) bool attention mask, True = attend.

    Args:
        q_idx, k_idx: (B, Lq), (B, Lk) original sequence indices of the query / key rows.
        key_ok: (B, Lk) keys that may be attended (real and not pruned).
        causal: ``j <= i``; otherwise bidirectional.
        window: sliding window w (``i - w < j`` causal, ``|i - j| < w`` bidirectional) or ``None``.

    A query row with no visible key attends to itself only (padding rows, or a pruned row with nothing visible),
    so no row is empty (an empty row would give NaN, and NaN values poison every row through the softmax weights).
    """
    qi, kj = q_idx[:, None, :, None], k_idx[:, None, None, :]
    allowed = key_ok[:, None, None, :].expand(-1, 1, qi.shape[2], -1)
    if causal:
        allowed = allowed & (kj <= qi)
        if window is not None:
            allowed = allowed & (kj > qi - window)
    elif window is not None:
        allowed = allowed & ((qi - kj).abs() < window)
    empty = ~allowed.any(dim=-1, keepdim=True)
    return allowed | (empty & (kj == qi))


def layer_mask(allowed: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The bool mask in the form the layer's attention function takes: bool for SDPA, additive for eager."""
    if attn_implementation != "eager":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


class LayerRotary:
    """Each layer's rotary ``(cos, sin)`` for the current rows, computed once per layer type until the rows change.

    ``model.rotary_emb(x, position_ids)``, or ``(x, position_ids, layer_type)`` where the family keeps one table per
    layer type (Gemma 3). Position ids: (B, L), or (3, B, L) M-RoPE.
    """

    def __init__(self, model: nn.Module, types: list[str]) -> None:
        self.model, self.types = model, types
        self.per_type = "layer_type" in inspect.signature(model.rotary_emb.forward).parameters
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def reset(self) -> None:
        """Forget the cached tables (the rows or their positions changed)."""
        self.cache.clear()

    def __call__(self, i: int, h: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = self.types[i] if self.per_type else ""
        if key not in self.cache:
            extra = (key,) if self.per_type else ()
            self.cache[key] = self.model.rotary_emb(h, pos, *extra)
        return self.cache[key]


def layer_qk(layer: nn.Module, h: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Layer ``layer``'s rotated queries and (repeated) keys for hidden states h (B, L, d): (B, H, L, d_h) each."""
    attn = layer.self_attn
    # the family's own rotary helper: Phi-3 rotates only part of each head (partial_rotary_factor)
    apply_rotary_pos_emb = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    b, length, _ = h.shape
    x = layer.input_layernorm(h)
    hd = attn.head_dim
    if hasattr(attn, "qkv_proj"):  # Phi-3: fused [q | k | v] projection
        n_q = attn.config.num_attention_heads * hd
        n_kv = attn.config.num_key_value_heads * hd
        q, k, _ = attn.qkv_proj(x).split([n_q, n_kv, n_kv], dim=-1)
        q, k = q.reshape(b, length, -1, hd), k.reshape(b, length, -1, hd)
    else:
        q = attn.q_proj(x).view(b, length, -1, hd)
        k = attn.k_proj(x).view(b, length, -1, hd)
    if hasattr(attn, "q_norm"):  # Qwen3, Gemma 3 (RMSNorm over d_h)
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), *cos_sin)
    return q, k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)


def logit_args(layer: nn.Module) -> dict[str, float | None]:
    """The layer's logit scale and softcap (``scaling``, ``softcap``), as its attention applies them."""
    attn = layer.self_attn
    return {"scaling": getattr(attn, "scaling", None), "softcap": getattr(attn, "attn_logit_softcapping", None)}
