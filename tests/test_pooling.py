"""Latent-attention (NV-Embed) and multi-layer (Tang & Yang) poolers."""

from __future__ import annotations

import torch

from mmembed.pooling import LatentAttentionPooler, MultiLayerPooler
from tests.tiny_models import build, rows


def test_latent_attention_ignores_padding_and_instruction_tokens():
    torch.manual_seed(0)
    pool = LatentAttentionPooler(dim=16, num_latents=4, num_heads=2).eval()
    h = torch.randn(2, 6, 16)
    am = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    pm = am.clone()
    pm[:, :3] = 0  # instruction
    out = pool(h, am, pm)
    h2 = h.clone()
    h2[0, 0] += 5.0  # padding
    h2[:, 1] -= 3.0  # instruction
    assert torch.allclose(out, pool(h2, am, pm), atol=1e-6)
    h2[:, 4] += torch.randn(16)  # a pooled token
    assert (out - pool(h2, am, pm)).abs().max() > 1e-3
    # latents matter: tokens attend to them
    with torch.no_grad():
        pool.latents.add_(torch.randn_like(pool.latents))
    assert (out - pool(h, am, pm)).abs().max() > 1e-4


def test_multi_layer_reads_every_layer():
    torch.manual_seed(0)
    pool = MultiLayerPooler(dim=16, num_layers=3, num_latents=2, num_heads=2).eval()
    layers = [torch.randn(2, 5, 16) for _ in range(3)]
    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    out = pool(tuple(layers), am, am)
    assert out.shape == (2, 16)
    changed = [t.clone() for t in layers]
    changed[0][0, 4] += torch.randn(16)  # the first layer's last real token of row 0
    diff = (out - pool(tuple(changed), am, am)).abs().max(dim=1).values
    assert diff[0] > 1e-4 and diff[1] < 1e-6  # row 1's last real token is index 2


def test_poolers_keep_batch_and_padding_invariance():
    texts, images, instr = rows()
    for pooler in ("{type: latent_attention, num_latents: 8}", "{type: multi_layer, per_layer: mean}"):
        left = build(f"model.pooler={pooler}")
        right = build(f"model.pooler={pooler}", "model.padding_side=right")
        right.load_state_dict(left.state_dict())
        a = left.encode(texts=texts, images=images, instruction=instr, batch_size=5)
        for other in (
            left.encode(texts=texts, images=images, instruction=instr, batch_size=1),
            right.encode(texts=texts, images=images, instruction=instr, batch_size=2),
        ):
            assert abs(a - other).max() <= 1e-5, pooler
