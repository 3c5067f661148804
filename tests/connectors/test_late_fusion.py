"""NoteLLM-2 late fusion and the mICL auxiliary output."""

from __future__ import annotations

import torch
from torch import nn

from mmembed.connectors.late_fusion import LateFusion
from tests.tiny_models import build, rows


class _Const(nn.Module):
    def __init__(self, value: float, dim: int) -> None:
        super().__init__()
        self.value, self.dim = value, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], self.dim), self.value)


def test_gate_forced_to_zero_returns_the_text_representation_and_one_returns_the_image():
    fusion = LateFusion(dim=8, vision_dim=5)
    n, g = torch.randn(4, 8), torch.randn(4, 5)
    fusion.gate = _Const(-1e4, 8)  # z = sigmoid(-1e4) = 0
    assert torch.equal(fusion(n, g), n)
    fusion.gate = _Const(1e4, 8)  # z = 1
    assert torch.allclose(fusion(n, g), fusion.proj(g))


def test_gate_is_bias_free_xavier_and_rows_without_image_pass_through():
    fusion = LateFusion(dim=8, vision_dim=5)
    assert fusion.gate.bias is None and fusion.proj.bias is None
    n, g = torch.randn(3, 8), torch.randn(3, 5)
    out = fusion(n, g, torch.tensor([False, True, False]))
    assert torch.equal(out[0], n[0]) and torch.equal(out[2], n[2]) and (out[1] - n[1]).abs().max() > 1e-4


def test_model_fuses_image_rows_only_and_returns_the_micl_visual_representation():
    model = build("model.fusion={type: late_fusion, micl_token: '<IMG_EMB>'}")
    base = build()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("fusion.")}, strict=False)
    texts, images, instr = rows()
    a = model.encode(texts=texts, images=images, instruction=instr)
    b = base.encode(texts=texts, images=images, instruction=instr)
    assert abs(a[0] - b[0]).max() <= 1e-5  # text-only row: passed through (embedding rows grew by one token)
    assert abs(a[1] - b[1]).max() > 1e-4  # image row: fused
    assert abs(a - model.encode(texts=texts, images=images, instruction=instr, batch_size=1)).max() <= 1e-5
    side_texts = [
        'Note: {"image":"<image>"}, compress into one word:"<IMG_EMB>". Note: {"title": "a red circle"}',
        "no compression token here",
    ]
    batch = model.processor([model._rows(side_texts, [images[1], None], None)[i] for i in range(2)])
    with torch.no_grad():
        emb, aux = model.forward_with_aux(batch)
    assert aux["visual_mask"].tolist() == [True, False]
    assert aux["visual"].shape == emb.shape and (aux["visual"][0] - emb[0]).abs().max() > 1e-4
