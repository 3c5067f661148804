"""Progressive visual-token pruning inside the LLM (AIM), with pruned rows really removed.

Zhong et al., "AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning", ICCV 2025,
arXiv 2412.03248; LaVi-Lab/AIM ``other_packages/transformers/.../modeling_qwen2.py``. docs/algorithms.md §5b.

Importance at layer l is PageRank on that layer's attention: ``M = softmax(A / tau)`` per head (A = QK^T/sqrt(d_h)
plus the mask), ``p^{t+1} = p^t M`` from ``p^0`` uniform over real tokens, 5 iterations, ``score_j = sqrt(mean_h
p_hj^2)``. After layer l each row keeps all text tokens and the top ``round(N_vis * rho(l))`` visual tokens, counted
against the *original* visual count. The reference only masks; here the decoder runs layer by layer
(:func:`pruned_forward`) and kept rows are gathered, with their original position ids and rotary embeddings, so
later layers really cost less. The output is scattered back to the input length with a keep mask.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mmembed.registry import PRUNERS
from mmembed.types import ConfigError

__all__ = ["Pruner", "AIMPruner", "pruned_forward", "aim_schedule"]


def aim_schedule(num_layers: int, start_layer: int | None = None, step: float = 0.125) -> list[float]:
    """AIM's rho(l): 1 before ``start_layer`` (default ``num_layers // 2``), then ``1 - (l - start + 1) * step``."""
    start = num_layers // 2 if start_layer is None else start_layer
    return [1.0 if i < start else max(0.0, 1.0 - (i - start + 1) * step) for i in range(num_layers)]


class Pruner(nn.Module):
    """The pruning contract: which visual tokens each LLM layer drops (text is never pruned).

    ``keep_ratios``: per layer, the fraction of the original visual tokens kept after it (non-increasing);
    ``importance(q, k, allowed, valid) -> (B, L)`` scores the tokens at a layer. Every backbone runs it through
    :func:`pruned_forward`.
    """

    keep_ratios: list[float]

    def importance(self, q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.importance(q, k, allowed, valid)


@PRUNERS.register("aim")
class AIMPruner(Pruner):
    """AIM's progressive pruning: a layer-wise keep schedule, tokens scored by attention PageRank.

    Args:
        num_layers: LLM depth (injected): the schedule may not be longer.
        schedule: fraction of the original visual tokens kept *after* each layer; missing tail layers repeat the
            last value; made non-increasing. ``None`` uses AIM's piecewise-linear schedule.
        start_layer: AIM's l1 (first layer whose output is pruned); default ``num_layers // 2``.
        step: AIM's per-layer decrement (1/8).
        temperature: tau of the importance softmax (0.1).
        iterations: PageRank iterations (5).
    """

    example_args = [{}, {"schedule": [1.0, 0.5]}, {"schedule": [1.0], "temperature": 1.0, "iterations": 2}]

    def __init__(
        self,
        num_layers: int = 1,
        schedule: list[float] | None = None,
        start_layer: int | None = None,
        step: float = 0.125,
        temperature: float = 0.1,
        iterations: int = 5,
    ) -> None:
        super().__init__()
        self.check_config(
            {"schedule": schedule, "step": step, "temperature": temperature, "iterations": iterations},
            prefix="model.prune.",
        )
        if schedule is not None and len(schedule) > num_layers:
            raise ConfigError(
                "model.prune.schedule",
                f"has {len(schedule)} entries but the backbone has {num_layers} layers; allowed: at most {num_layers}",
            )
        if start_layer is not None and not 0 <= start_layer <= num_layers:
            raise ConfigError("model.prune.start_layer", f"must be in [0, {num_layers}], got {start_layer}")
        ratios = list(schedule) if schedule else aim_schedule(num_layers, start_layer, step)
        ratios += [ratios[-1]] * (num_layers - len(ratios))
        for i in range(1, len(ratios)):
            ratios[i] = min(ratios[i], ratios[i - 1])
        self.keep_ratios = [float(r) for r in ratios]
        self.temperature, self.iterations = float(temperature), int(iterations)

    @staticmethod
    def check_config(args: dict[str, Any], prefix: str = "") -> None:
        sched = args.get("schedule")
        if sched is not None:
            if not isinstance(sched, (list, tuple)) or not sched:
                raise ConfigError(f"{prefix}schedule", f"must be a non-empty list of ratios in [0, 1], got {sched!r}")
            for r in sched:
                if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= float(r) <= 1.0:
                    raise ConfigError(f"{prefix}schedule", f"every ratio must be in [0, 1], got {r!r}")
        if float(args.get("temperature", 0.1)) <= 0:
            raise ConfigError(f"{prefix}temperature", "must be > 0")
        if int(args.get("iterations", 5)) < 1:
            raise ConfigError(f"{prefix}iterations", "must be >= 1")
        if not 0.0 < float(args.get("step", 0.125)) <= 1.0:
            raise ConfigError(f"{prefix}step", "must be in (0, 1]")

    def importance(self, q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """PageRank token importance.

        Args:
            q, k: (B, H, L, d_h) rotated queries and (repeated) keys of the scored layer.
            allowed: (B, 1, L, L) bool attention mask (causal/padding/pruning), diagonal on.
            valid: (B, L) bool real (unpadded, unpruned) tokens.

        Returns:
            (B, L) scores; invalid tokens get -1.
        """
        scale = 1.0 / (math.sqrt(q.shape[-1]) * self.temperature)
        logits = (q.float() * scale) @ k.float().transpose(-1, -2)  # (B, H, L, L) = A / tau
        m = logits.masked_fill_(~allowed, float("-inf")).softmax(dim=-1)
        p = valid.float() / valid.float().sum(-1, keepdim=True).clamp_min(1.0)
        p = p[:, None, None, :].expand(-1, q.shape[1], 1, -1)  # (B, H, 1, L)
        for _ in range(self.iterations):
            p = p @ m
        score = p.squeeze(2).pow(2).mean(dim=1).sqrt()  # (B, L)
        return score.masked_fill(~valid, -1.0)


def _allowed(valid: torch.Tensor, causal: bool) -> torch.Tensor:
    """(B, L) real-token mask -> (B, 1, L, L) bool attention mask; the diagonal is always on (no empty rows)."""
    length = valid.shape[1]
    eye = torch.eye(length, dtype=torch.bool, device=valid.device)
    allowed = valid[:, None, None, :].expand(-1, 1, length, -1)
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    return allowed | eye


def _qk(layer: nn.Module, h: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Layer ``layer``'s rotated queries and keys for hidden states h (B, L, d): (B, H, L, d_h) each."""
    import sys

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
    if hasattr(attn, "q_norm"):  # Qwen3
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), *cos_sin)
    return q, k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)


def pruned_forward(
    model: nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    visual_mask: torch.Tensor,
    pruner: Pruner,
    causal: bool = True,
    all_layers: bool = False,
) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor]:
    """Run an HF decoder base model layer by layer, removing pruned visual rows after each scheduled layer.

    Args:
        model: the HF base model (``layers``, ``rotary_emb``, ``norm``; Llama/Qwen2/Qwen3/Mistral-style layers).
        inputs_embeds: (B, L, d); attention_mask, visual_mask: (B, L); position_ids: (B, L), or (3, B, L) M-RoPE
            ids (Qwen2-VL).
        pruner: gives the schedule and the importance score.
        causal: causal or bidirectional (padding-only) attention.
        all_layers: return every layer's output (scattered back to (B, L, d)) instead of the last.

    Returns:
        hidden (B, L, d) (pruned rows zero) or a tuple of them, and ``kept`` (B, L) bool: real tokens still
        present at the last layer.
    """
    attn0 = model.layers[0].self_attn
    if not (hasattr(attn0, "q_proj") or hasattr(attn0, "qkv_proj")):
        raise ValueError("token pruning needs Llama/Qwen/Phi-3-style attention modules (q_proj/k_proj or qkv_proj)")
    eager = model.config._attn_implementation == "eager"
    b, length, d = inputs_embeds.shape
    h, pos = inputs_embeds, position_ids
    valid = attention_mask.bool()
    vis = visual_mask.bool() & valid
    orig = torch.arange(length, device=h.device).expand(b, length)
    n_vis0 = vis.sum(dim=1)  # (B,)

    def scatter(x: torch.Tensor) -> torch.Tensor:
        full = x.new_zeros(b, length, d)
        return full.scatter(1, orig[..., None].expand(-1, -1, d), x * valid[..., None].to(x.dtype))

    outs: list[torch.Tensor] = []
    n_layers = len(model.layers)
    for i, layer in enumerate(model.layers):
        allowed = _allowed(valid, causal)
        mask = allowed
        if eager:
            mask = torch.zeros(allowed.shape, dtype=h.dtype, device=h.device).masked_fill(
                ~allowed, torch.finfo(h.dtype).min
            )
        cos_sin = model.rotary_emb(h, pos)
        need = torch.round(n_vis0.float() * pruner.keep_ratios[i]).long()  # (B,)
        prune = bool((vis.sum(dim=1) > need).any())
        if prune:
            with torch.no_grad():
                scores = pruner.importance(*_qk(layer, h, cos_sin), allowed, valid)
        # M-RoPE (3, B, L) ids are already folded into cos_sin; the layers take 1-D ids only
        h = layer(h, attention_mask=mask, position_ids=pos if pos.dim() == 2 else None, position_embeddings=cos_sin)
        last = i == n_layers - 1
        if all_layers:
            outs.append(scatter(model.norm(h) if last else h))
        if prune and not last:
            s = scores.masked_fill(~vis, float("-inf"))
            order = s.argsort(dim=1, descending=True, stable=True)
            rank = torch.empty_like(order).scatter_(
                1, order, torch.arange(h.shape[1], device=h.device).expand_as(order)
            )
            keep = valid & (~vis | (rank < need[:, None]))
            new_len = int(keep.sum(dim=1).max())
            idx = keep.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :new_len]  # kept first, in order
            h = h.gather(1, idx[..., None].expand(-1, -1, d))
            pos = pos.gather(-1, idx.expand_as(pos[..., :new_len]) if pos.dim() == 3 else idx)
            orig = orig.gather(1, idx)
            valid = keep.gather(1, idx)
            vis = vis.gather(1, idx) & valid
    kept = torch.zeros(b, length, dtype=torch.bool, device=h.device).scatter(1, orig, valid)
    if all_layers:
        return tuple(outs), kept
    return scatter(model.norm(h)), kept
