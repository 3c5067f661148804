"""Progressive visual-token pruning inside the LLM (AIM): the reference's masking (``exact``) or row removal (``fast``).

Zhong et al., "AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning", ICCV 2025,
arXiv 2412.03248; LaVi-Lab/AIM ``other_packages/transformers/.../modeling_qwen2.py``. docs/algorithms.md §5b.

Importance at layer l is PageRank on that layer's attention: ``M = softmax(A / tau)`` per head (A = the layer's
logits ``QK^T * scaling`` plus the mask), ``p^{t+1} = p^t M`` from a uniform ``p^0``, 5 iterations, ``score_j =
sqrt(mean_h p_hj^2)``. After layer l each row keeps all text tokens and the top ``floor(N_vis * rho(l))`` visual
tokens, counted against the *original* visual count (the reference's ``int(n * rate)``).

Two modes (:func:`pruned_forward`), same schedule and score:

- ``exact`` (default), the reference: pruned tokens stay as rows but are masked out as *keys* of every later layer;
  their queries are still computed, so they still vote in later layers' PageRank, whose ``p^0`` is uniform over
  *all* real tokens (pruned included); pruned tokens score -1 and are never re-kept. No compute is saved.
- ``fast``: pruned rows are removed (kept rows gathered with their original position ids), so later layers really
  cost less; PageRank then starts uniform over the survivors and pruned tokens no longer vote, an approximation of
  ``exact`` (the kept sets differ by a few tokens on random tiny models; see the reference test).

Both rebuild each layer's mask (sliding windows, per-layer types) and rotary embedding as the family's forward does
(:mod:`mmembed.tokens.layers`); the output is (B, L, d) with a keep mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmembed.registry import PRUNERS
from mmembed.tokens import layers as tl
from mmembed.types import ConfigError

__all__ = ["Pruner", "AIMPruner", "pruned_forward", "aim_schedule", "keep_count", "MODES"]

MODES = ("exact", "fast")


def aim_schedule(num_layers: int, start_layer: int | None = None, step: float = 0.125) -> list[float]:
    """AIM's rho(l): 1 before ``start_layer`` (default ``num_layers // 2``), then ``1 - (l - start + 1) * step``."""
    start = num_layers // 2 if start_layer is None else start_layer
    return [1.0 if i < start else max(0.0, 1.0 - (i - start + 1) * step) for i in range(num_layers)]


def keep_count(n_vis: torch.Tensor, ratio: float) -> torch.Tensor:
    """Visual tokens kept at ``ratio`` of the original counts n_vis (B,): ``int(n * ratio)`` as the reference (floor,
    in float64 like Python's float)."""
    return (n_vis.double() * float(ratio)).floor().long()


class Pruner(nn.Module):
    """The pruning contract: which visual tokens each LLM layer drops (text is never pruned).

    ``keep_ratios``: per layer, the fraction of the original visual tokens kept after it (non-increasing);
    ``mode``: ``exact`` | ``fast`` (see the module doc); ``importance(q, k, allowed, valid, voters=None, scaling=None,
    softcap=None) -> (B, L)`` scores the tokens at a layer. Every backbone runs it through :func:`pruned_forward`.
    """

    keep_ratios: list[float]
    mode: str = "exact"

    def importance(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        allowed: torch.Tensor,
        valid: torch.Tensor,
        voters: torch.Tensor | None = None,
        scaling: float | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
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
        mode: ``exact`` (the reference's masking; default) or ``fast`` (rows removed: real savings, approximate).
    """

    example_args = [
        {},
        {"schedule": [1.0, 0.5], "mode": "fast"},
        {"schedule": [1.0], "temperature": 1.0, "iterations": 2},
    ]

    def __init__(
        self,
        num_layers: int = 1,
        schedule: list[float] | None = None,
        start_layer: int | None = None,
        step: float = 0.125,
        temperature: float = 0.1,
        iterations: int = 5,
        mode: str = "exact",
    ) -> None:
        super().__init__()
        self.check_config(
            {"schedule": schedule, "step": step, "temperature": temperature, "iterations": iterations, "mode": mode},
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
        self.temperature, self.iterations, self.mode = float(temperature), int(iterations), mode

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
        if args.get("mode", "exact") not in MODES:
            raise ConfigError(f"{prefix}mode", f"got {args.get('mode')!r}; allowed: {', '.join(MODES)}")

    def importance(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        allowed: torch.Tensor,
        valid: torch.Tensor,
        voters: torch.Tensor | None = None,
        scaling: float | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """PageRank token importance (the reference's ``get_importance``, damping 0).

        Args:
            q, k: (B, H, L, d_h) rotated queries and (repeated) keys of the scored layer.
            allowed: (B, 1, L, L) bool attention mask (causal/window/padding/pruned keys); no row empty.
            valid: (B, L) bool candidates: real, unpruned tokens; the others score -1.
            voters: (B, L) bool support of the uniform ``p^0`` (default ``valid``); ``exact`` passes every real
                token, pruned ones included.
            scaling: logit scale (default ``d_h^-1/2``); softcap: Gemma 2's logit softcap.

        Returns:
            (B, L) fp32 scores.
        """
        voters = valid if voters is None else voters
        scale = 1.0 / math.sqrt(q.shape[-1]) if scaling is None else float(scaling)
        logits = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, H, L, L) = A
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        m = (logits / self.temperature).masked_fill_(~allowed, float("-inf")).softmax(dim=-1)
        p = voters.float() / voters.float().sum(-1, keepdim=True).clamp_min(1.0)
        p = p[:, None, None, :].expand(-1, q.shape[1], 1, -1)  # (B, H, 1, L)
        for _ in range(self.iterations):
            p = p @ m
        score = p.squeeze(2).pow(2).mean(dim=1).sqrt()  # (B, L)
        return score.masked_fill(~valid, -1.0)


def _select(scores: torch.Tensor, candidates: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the ``need`` (B,) best-scored ``candidates`` per row (ties: earlier index first)."""
    s = scores.masked_fill(~candidates, float("-inf"))
    order = s.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(s.shape[1], device=s.device).expand_as(order))
    return candidates & (rank < need[:, None])


def pruned_forward(
    model: nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    visual_mask: torch.Tensor,
    pruner: Pruner,
    causal: bool = True,
    all_layers: bool = False,
    trace: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor]:
    """Run an HF decoder base model layer by layer, pruning visual tokens after each scheduled layer.

    Args:
        model: the HF base model (``layers``, ``rotary_emb``, ``norm``; Llama/Qwen/Mistral/Phi-3/Gemma-style layers).
        inputs_embeds: (B, L, d); attention_mask, visual_mask: (B, L); position_ids: (B, L), or (3, B, L) M-RoPE
            ids (Qwen2-VL).
        pruner: gives the schedule, the mode (``exact`` masks pruned keys, ``fast`` removes pruned rows) and the
            importance score.
        causal: causal or bidirectional (padding-only) attention, as the backbone runs the model.
        all_layers: return every layer's output (scattered back to (B, L, d)) instead of the last.
        trace: if a list, gets after each layer the (B, L) bool mask of the real tokens still kept.

    Returns:
        hidden (B, L, d) (pruned rows zero) or a tuple of them, and ``kept`` (B, L) bool: real tokens still
        kept at the last layer.
    """
    attn0 = model.layers[0].self_attn
    if not (hasattr(attn0, "q_proj") or hasattr(attn0, "qkv_proj")):
        raise ValueError("token pruning needs Llama/Qwen/Phi-3-style attention modules (q_proj/k_proj or qkv_proj)")
    config = model.config
    n_layers = len(model.layers)
    types = tl.layer_types(config, n_layers)
    windows = tl.layer_windows(config, n_layers)
    if getattr(config, "use_bidirectional_attention", False):  # Gemma 3: the model's own bidirectional masks
        causal = False
    elif not causal:  # the backbone's padding-only mask reaches every layer
        windows = [None] * n_layers
    run = _exact if getattr(pruner, "mode", "exact") == "exact" else _fast
    plan = _Plan(pruner, causal, all_layers, trace, types, windows)
    return run(model, inputs_embeds, attention_mask.bool(), position_ids, visual_mask.bool(), plan)


@dataclass
class _Plan:
    """What a pruned run needs besides the tensors."""

    pruner: Pruner
    causal: bool
    all_layers: bool
    trace: list[torch.Tensor] | None
    types: list[str]
    windows: list[int | None]


_Out = tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor]


def _layer(
    model: nn.Module, i: int, h: torch.Tensor, allowed: torch.Tensor, pos: torch.Tensor, cos_sin: tuple[Any, Any]
) -> torch.Tensor:
    """Layer i on rows h (B, L, d) with the bool mask ``allowed`` (B, 1, L, L)."""
    mask = tl.layer_mask(allowed, model.config._attn_implementation, h.dtype)
    # M-RoPE (3, B, L) ids are already folded into cos_sin; the layers take 1-D ids only
    pos_1d = pos if pos.dim() == 2 else None
    return model.layers[i](h, attention_mask=mask, position_ids=pos_1d, position_embeddings=cos_sin)


def _exact(
    model: nn.Module, h: torch.Tensor, real: torch.Tensor, pos: torch.Tensor, visual: torch.Tensor, plan: _Plan
) -> _Out:
    """The reference: every row stays; pruned tokens are masked as keys and still vote (p^0 over all real tokens)."""
    b, length, _ = h.shape
    pruner = plan.pruner
    alive = real.clone()
    vis = visual & real
    n_vis0 = vis.sum(dim=1)
    idx = torch.arange(length, device=h.device).expand(b, length)
    rotary = tl.LayerRotary(model, plan.types)
    outs: list[torch.Tensor] = []
    n_layers = len(model.layers)
    for i, layer in enumerate(model.layers):
        allowed = tl.allowed_mask(idx, idx, alive, plan.causal, plan.windows[i])
        cos_sin = rotary(i, h, pos)
        need = keep_count(n_vis0, pruner.keep_ratios[i])
        prune = i < n_layers - 1 and bool(((vis & alive).sum(dim=1) > need).any())
        if prune:
            with torch.no_grad():
                q, k = tl.layer_qk(layer, h, cos_sin)
                scores = pruner.importance(q, k, allowed, alive, voters=real, **tl.logit_args(layer))
        out_rows = alive  # rows whose outputs this layer means (pruned rows' are discarded)
        h = _layer(model, i, h, allowed, pos, cos_sin)
        if plan.all_layers:
            outs.append((model.norm(h) if i == n_layers - 1 else h) * out_rows[..., None].to(h.dtype))
        if prune:
            alive = alive & (~vis | _select(scores, vis & alive, need))
        if plan.trace is not None:
            plan.trace.append(alive.clone())
    if plan.all_layers:
        return tuple(outs), alive
    return model.norm(h) * alive[..., None].to(h.dtype), alive


def _fast(
    model: nn.Module, h: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor, visual: torch.Tensor, plan: _Plan
) -> _Out:
    """Pruned rows removed: kept rows gathered with their original positions; p^0 over the survivors."""
    b, length, d = h.shape
    pruner = plan.pruner
    vis = visual & valid
    orig = torch.arange(length, device=h.device).expand(b, length)
    n_vis0 = vis.sum(dim=1)
    rotary = tl.LayerRotary(model, plan.types)

    def scatter(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        full = x.new_zeros(b, length, x.shape[-1])
        return full.scatter(1, orig[..., None].expand(-1, -1, x.shape[-1]), x * rows[..., None].to(x.dtype))

    outs: list[torch.Tensor] = []
    n_layers = len(model.layers)
    for i, layer in enumerate(model.layers):
        allowed = tl.allowed_mask(orig, orig, valid, plan.causal, plan.windows[i])
        cos_sin = rotary(i, h, pos)
        need = keep_count(n_vis0, pruner.keep_ratios[i])
        prune = i < n_layers - 1 and bool((vis.sum(dim=1) > need).any())
        if prune:
            with torch.no_grad():
                scores = pruner.importance(*tl.layer_qk(layer, h, cos_sin), allowed, valid, **tl.logit_args(layer))
        h = _layer(model, i, h, allowed, pos, cos_sin)
        if plan.all_layers:
            outs.append(scatter(model.norm(h) if i == n_layers - 1 else h, valid))
        if prune:
            keep = valid & (~vis | _select(scores, vis, need))
            new_len = int(keep.sum(dim=1).max())
            sel = keep.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :new_len]  # kept first, in order
            h = h.gather(1, sel[..., None].expand(-1, -1, d))
            pos = pos.gather(-1, sel.expand_as(pos[..., :new_len]) if pos.dim() == 3 else sel)
            orig = orig.gather(1, sel)
            valid = keep.gather(1, sel)
            vis = vis.gather(1, sel) & valid
            rotary.reset()
        if plan.trace is not None:
            plan.trace.append(torch.zeros(b, length, dtype=torch.bool, device=h.device).scatter(1, orig, valid))
    kept = torch.zeros(b, length, dtype=torch.bool, device=h.device).scatter(1, orig, valid)
    if plan.all_layers:
        return tuple(outs), kept
    return scatter(model.norm(h), valid), kept
