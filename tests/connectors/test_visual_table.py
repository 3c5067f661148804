"""Ovis visual embedding table: one-hot -> exact table row, indicators, stride, memory-aware inference."""

from __future__ import annotations

import torch

from mmembed.connectors.visual_table import VisualTable, space_to_depth, straight_through_argmax
from tests.tiny_models import build, rows


def test_one_hot_distribution_returns_exactly_the_table_row():
    vt = VisualTable(in_dim=6, out_dim=10, vocab_size=32)
    onehot = torch.nn.functional.one_hot(torch.tensor([3, 0, 29]), 30).float()
    assert torch.equal(vt.embed_probs(onehot), vt.table[[3, 0, 29]])
    st = VisualTable(in_dim=6, out_dim=10, vocab_size=32, tokenize="st").eval()
    with torch.no_grad():
        out = st(torch.randn(2, 16, 6), (4, 4))
    ids = st.probabilities(torch.randn(1, 6)).argmax(-1)
    assert ids.shape == (1,)
    rows_ = out[:, 1:-1].reshape(-1, 10)
    dist = torch.cdist(rows_, st.table[:30], compute_mode="donot_use_mm_for_euclid_dist")
    assert (dist.min(dim=1).values == 0).all()  # every atom row is exactly a table row


def test_indicator_rows_around_each_image_and_softmax_is_a_mixture():
    vt = VisualTable(in_dim=6, out_dim=10, vocab_size=32)
    out = vt(torch.randn(2, 16, 6), (4, 4))
    assert out.shape == (2, 18, 10) and vt.num_tokens((4, 4)) == 18
    assert torch.equal(out[:, 0], vt.table[30].expand(2, -1)) and torch.equal(out[:, -1], vt.table[31].expand(2, -1))
    p = vt.probabilities(torch.randn(5, 6))
    assert torch.allclose(p.sum(-1), torch.ones(5)) and (p > 0).all()


def test_hidden_stride_is_space_to_depth_with_zero_padding():
    x = torch.arange(25.0).reshape(1, 25, 1)
    y, grid = space_to_depth(x, (5, 5), 2)
    assert grid == (3, 3) and y.shape == (1, 9, 4)
    assert y[0, 0].tolist() == [0.0, 1.0, 5.0, 6.0] and y[0, 8].tolist() == [24.0, 0.0, 0.0, 0.0]
    assert VisualTable(in_dim=6, out_dim=10, vocab_size=32, hidden_stride=2).num_tokens((5, 5)) == 11


def test_inference_materializes_one_image_of_probabilities_at_a_time():
    vt = VisualTable(in_dim=6, out_dim=10, vocab_size=64).eval()
    seen = []
    orig = vt.probabilities
    vt.probabilities = lambda f: (seen.append(tuple(f.shape)), orig(f))[1]
    x = torch.randn(4, 16, 6)
    with torch.no_grad():
        a = vt(x, (4, 4))
    assert seen == [(1, 16, 6)] * 4
    seen.clear()
    b = vt(x, (4, 4))  # with grad: one batched call
    assert seen == [(4, 16, 6)] and torch.allclose(a, b, atol=1e-6)


def test_gumbel_is_hard_in_training_and_deterministic_in_eval():
    vt = VisualTable(in_dim=6, out_dim=10, vocab_size=32, tokenize="gumbel", tau=0.5)
    f = torch.randn(7, 6)
    p = vt.train().probabilities(f)
    assert torch.allclose(p.sum(-1), torch.ones(7)) and ((p.detach() == 0) | (p.detach() == 1)).all()
    vt.eval()
    assert torch.equal(vt.probabilities(f), vt.probabilities(f))


def test_model_with_visual_table_encodes_and_is_invariant():
    model = build("model.connector={type: visual_table, vocab_size: 128, init_std: 0.02}")
    assert model.processor.image_tokens == 18
    texts, images, instr = rows()
    a = model.encode(texts=texts, images=images, instruction=instr, batch_size=5)
    assert abs(a - model.encode(texts=texts, images=images, instruction=instr, batch_size=1)).max() <= 1e-5


def ovis_st_argmax(y_soft: torch.Tensor, dim: int) -> torch.Tensor:
    """Port of AIDC-AI/Ovis ``ovis/model/visual_tokenizer/base_visual_tokenizer.py`` ``tokenize``'s ``st_argmax``,
    which ``tokenize_function="st_argmax"`` calls with the head's logits."""
    index = y_soft.max(dim, keepdim=True)[1]
    y_hard = torch.zeros_like(y_soft, memory_format=torch.legacy_contiguous_format).scatter_(dim, index, 1.0)
    return y_hard - y_soft.detach() + y_soft


def old_st(logits: torch.Tensor) -> torch.Tensor:
    """mmembed's ``st`` before issue #13: straight-through on the softmax probabilities."""
    soft = logits.softmax(dim=-1)
    hard = torch.nn.functional.one_hot(soft.argmax(dim=-1), soft.shape[-1]).to(soft.dtype)
    return hard if not torch.is_grad_enabled() else hard - soft.detach() + soft


def test_st_matches_ovis_st_argmax_forward_and_gradients():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 30) * 2
    upstream = torch.randn(3, 7, 30)
    ours_in, ref_in, old_in = (logits.clone().requires_grad_() for _ in range(3))
    ours, ref = straight_through_argmax(ours_in), ovis_st_argmax(ref_in, dim=-1)
    assert torch.equal(ours, ref)
    (ours * upstream).sum().backward()
    (ref * upstream).sum().backward()
    assert torch.equal(ours_in.grad, ref_in.grad) and torch.equal(ours_in.grad, upstream)  # identity Jacobian
    (old_st(old_in) * upstream).sum().backward()
    assert not torch.allclose(old_in.grad, ref_in.grad)  # the softmax Jacobian the old mode used


def test_st_connector_gradients_reach_the_head_as_in_ovis():
    torch.manual_seed(0)
    vt = VisualTable(in_dim=6, out_dim=10, vocab_size=32, tokenize="st").train()
    feats, upstream = torch.randn(2, 9, 6), torch.randn(2, 9, 30)
    (vt.probabilities(feats) * upstream).sum().backward()
    ours = vt.head.weight.grad.clone()
    vt.zero_grad()
    (ovis_st_argmax(vt.head_norm(vt.head(feats)).float(), -1) * upstream).sum().backward()
    assert torch.equal(ours, vt.head.weight.grad) and ours.abs().sum() > 0


def test_st_inference_is_the_exact_one_hot_the_previous_mode_gave():
    """Forward outputs of saved ``st`` models are unchanged (only gradients changed), so nothing is pinned."""
    torch.manual_seed(0)
    vt = VisualTable(in_dim=6, out_dim=10, vocab_size=256, tokenize="st").eval()
    feats = torch.randn(4, 64, 6)
    with torch.no_grad():
        p = vt.probabilities(feats)
        logits = vt.head_norm(vt.head(feats)).float()
        assert torch.equal(p, old_st(logits)) and torch.equal(p.sum(-1), torch.ones(4, 64))
        torch.testing.assert_close(p, ovis_st_argmax(logits, -1), rtol=0, atol=1e-6)
