"""AIM pruning against a port of the reference (LaVi-Lab/AIM, modified ``modeling_qwen2.py``).

The port below follows the reference's ``Qwen2Model.forward`` + ``get_importance`` as plainly as possible, on batch 1
as the reference runs: pruned tokens stay as rows, the 2-D ``attention_mask &= token_mask`` hides them as keys of
the following layers (additive 4-D causal mask), importance is PageRank on the layer's masked attention logits from
``p0 = 1/N`` over every token, already-masked tokens score -1, protected (text) tokens 1.0, and the top
``int((N - n_prot) * rate + n_prot)`` are kept. ``exact`` must equal it; ``fast`` must equal the port restricted to
the survivors (``p0`` uniform over the kept tokens only).
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Qwen2Config, Qwen2Model
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb, repeat_kv

from mmembed.tokens.prune import AIMPruner, aim_schedule, keep_count, pruned_forward


def get_importance(attention_score: torch.Tensor, tau_imp: float = 0.1, iters: int = 5) -> torch.Tensor:
    """The reference's PageRank on (B, H, N, N) masked logits: p0 = 1/N, ``p <- p M``, sqrt(mean_h p^2)."""
    b, h, n, _ = attention_score.shape
    m = torch.softmax(attention_score / tau_imp, dim=-1, dtype=torch.float32)
    dist = torch.ones(b, h, 1, n) / n
    for _ in range(iters):
        dist = dist @ m
    return dist.pow(2).mean(dim=1).pow(0.5).view(b, n)


def get_importance_survivors(attention_score: torch.Tensor, alive: torch.Tensor, tau_imp: float = 0.1, iters: int = 5):
    """The same PageRank with p0 uniform over the surviving tokens only (what removing the rows gives)."""
    b, h, n, _ = attention_score.shape
    m = torch.softmax(attention_score / tau_imp, dim=-1, dtype=torch.float32)
    dist = (alive.float() / alive.float().sum())[:, None, None, :].expand(b, h, 1, n)
    for _ in range(iters):
        dist = dist @ m
    return dist.pow(2).mean(dim=1).pow(0.5).view(b, n)


def reference_aim(lm: Qwen2Model, embeds: torch.Tensor, protected: torch.Tensor, retain_rate: list[float], voters: str):
    """Port of AIM's pruned Qwen2 forward (eager attention), batch 1.

    Args:
        embeds: (1, N, d); protected: (N,) bool text tokens; retain_rate: per layer.
        voters: ``all`` (the reference) or ``survivors``.

    Returns:
        per-layer (N,) bool token masks after each layer, and the normed last hidden state (1, N, d).
    """
    n = embeds.shape[1]
    position_ids = torch.arange(n)[None]
    attention_mask = torch.ones(1, n, dtype=torch.bool)
    hidden_states = embeds
    cos, sin = lm.rotary_emb(hidden_states, position_ids)
    protected_inds = protected.nonzero()[:, 0]
    protected_num = int(protected_inds.numel())
    masks = []
    for layer_idx, layer in enumerate(lm.layers):
        allowed = torch.ones(n, n, dtype=torch.bool).tril() & attention_mask[:, None, None, :]  # (1, 1, N, N)
        causal_mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        # Qwen2Attention (AIM): logits of this layer, + causal mask, then PageRank
        attn = layer.self_attn
        x = layer.input_layernorm(hidden_states)
        q = attn.q_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = repeat_kv(k, attn.num_key_value_groups)
        attn_weights = torch.matmul(q.float(), k.float().transpose(2, 3)) / math.sqrt(attn.head_dim) + causal_mask
        if voters == "all":
            importance_score = get_importance(attn_weights)
        else:
            importance_score = get_importance_survivors(attn_weights, attention_mask)
        hidden_states = layer(hidden_states, attention_mask=causal_mask, position_embeddings=(cos, sin))
        # keep rule after this layer
        masked_tokens = (~attention_mask).nonzero()
        importance_score[masked_tokens[:, 0], masked_tokens[:, 1]] = -1.0
        importance_score[0, protected_inds] = 1.0
        _, inds = torch.sort(importance_score, dim=-1, descending=True)
        keep_num = (inds.shape[1] - protected_num) * retain_rate[layer_idx] + protected_num
        keep_inds = inds[:, : int(keep_num)]
        token_mask = torch.zeros(1, n).scatter_(1, keep_inds, 1).bool()
        attention_mask = attention_mask & token_mask
        masks.append(attention_mask[0].clone())
    return masks, lm.norm(hidden_states)


def _trial(seed: int) -> tuple[Qwen2Model, torch.Tensor, torch.Tensor, list[float]]:
    """A random tiny Qwen2 (4 layers) and one random sequence [text | visual | text], with a random AIM schedule."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    cfg = Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=16,
        max_position_embeddings=256,
        initializer_range=0.2,  # peaked attention: with the default 0.02 PageRank is near-positional, both modes agree
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    lm = Qwen2Model(cfg).eval()
    pre, n_vis, post = pick(1, 4), pick(10, 40), pick(1, 6)
    embeds = torch.randn(1, pre + n_vis + post, 32, generator=g)
    visual = torch.zeros(pre + n_vis + post, dtype=torch.bool)
    visual[pre : pre + n_vis] = True
    schedule = aim_schedule(4, start_layer=pick(0, 1), step=[0.25, 0.3, 0.45][pick(0, 2)])
    return lm, embeds, visual, schedule


def _ours(lm, embeds, visual, schedule, mode):
    pruner = AIMPruner(num_layers=4, schedule=schedule, mode=mode)
    n = embeds.shape[1]
    trace: list[torch.Tensor] = []
    with torch.no_grad():
        hidden, kept = pruned_forward(
            lm, embeds, torch.ones(1, n, dtype=torch.long), torch.arange(n)[None], visual[None], pruner, trace=trace
        )
    return [t[0] for t in trace], hidden, kept[0]


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_pruning_equals_the_reference_port_over_random_trials(mode):
    """exact == the reference (pruned tokens vote); fast == the reference restricted to survivors; 10 trials."""
    voters = "all" if mode == "exact" else "survivors"
    for seed in range(10):
        lm, embeds, visual, schedule = _trial(seed)
        with torch.no_grad():
            ref_masks, ref_hidden = reference_aim(lm, embeds, ~visual, schedule, voters)
        masks, hidden, kept = _ours(lm, embeds, visual, schedule, mode)
        for layer, (a, b) in enumerate(zip(masks[:-1], ref_masks[:-1])):  # after the last layer nothing runs
            assert torch.equal(a, b), f"seed {seed}: kept tokens differ after layer {layer}"
        rows = kept.nonzero()[:, 0]
        assert torch.equal(kept, ref_masks[-2])
        tol = 1e-5 if mode == "exact" else 2e-6
        assert float((hidden[0, rows] - ref_hidden[0, rows]).abs().max()) <= tol, f"seed {seed}"
        assert bool((hidden[0, ~kept] == 0).all())


def test_the_two_modes_differ_where_pruned_tokens_vote():
    """Sanity of the comparison: on some trial the reference's voters change the kept set or the output."""
    differs = 0
    for seed in range(10):
        lm, embeds, visual, schedule = _trial(seed)
        a, ha, _ = _ours(lm, embeds, visual, schedule, "exact")
        b, hb, _ = _ours(lm, embeds, visual, schedule, "fast")
        differs += any(not torch.equal(x, y) for x, y in zip(a, b)) or float((ha - hb).abs().max()) > 1e-4
    assert differs > 0


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("n_vis", [49, 196])
def test_kept_counts_are_floored_as_the_reference(mode, n_vis):
    """AIM's 28-layer schedule: after layer l exactly int(n_vis * rho(l)) visual tokens remain (not round)."""
    rho = aim_schedule(28)
    cfg = Qwen2Config(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=28,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=16,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    lm = Qwen2Model(cfg).eval()
    n = 3 + n_vis + 4
    visual = torch.zeros(1, n, dtype=torch.bool)
    visual[0, 3 : 3 + n_vis] = True
    trace: list[torch.Tensor] = []
    with torch.no_grad():
        pruned_forward(
            lm,
            torch.randn(1, n, 16),
            torch.ones(1, n, dtype=torch.long),
            torch.arange(n)[None],
            visual,
            AIMPruner(num_layers=28, mode=mode),
            trace=trace,
        )
    counts = [int((t & visual).sum()) for t in trace[:-1]]
    assert counts == [int(n_vis * r) for r in rho[:-1]]
    assert [int(c) for c in keep_count(torch.tensor([n_vis]), 0.875)] == [int(n_vis * 0.875)]
    assert counts[14] != round(n_vis * 0.875)  # 42.875 -> 42 and 171.5 -> 171: rounding would keep one more
