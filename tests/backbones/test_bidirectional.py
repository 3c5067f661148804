"""``attention: bidirectional``: future tokens change past states only when it is on (SDPA and eager)."""

from __future__ import annotations

import pytest
import torch

from mmembed.config import ConfigError
from tests.tiny_models import build, rows


def _states(model, ids, am):
    pos = (am.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        return model.backbone.language_forward(model.backbone.embed(ids), am, pos)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_future_tokens_change_past_states_only_when_bidirectional(impl):
    causal = build(f"model.backbone.attn_implementation={impl}")
    bidir = build(f"model.backbone.attn_implementation={impl}", "model.backbone.attention=bidirectional")
    bidir.load_state_dict(causal.state_dict())
    ids = torch.randint(4, 300, (2, 8))
    am = torch.ones_like(ids)
    am[1, :2] = 0  # left padding in row 1
    ids2 = ids.clone()
    ids2[:, -1] = (ids[:, -1] + 7) % 300 + 4  # change only the last (future) token
    c1, c2 = _states(causal, ids, am), _states(causal, ids2, am)
    b1, b2 = _states(bidir, ids, am), _states(bidir, ids2, am)
    real = am[:, :-1].bool()  # pad rows' outputs are meaningless (eager lets them attend everywhere)
    assert (c1[:, :-1] - c2[:, :-1]).abs().amax(-1)[real].max() < 1e-6  # causal: the past does not see the future
    assert (b1[:, 2:-1] - b2[:, 2:-1]).abs().amin(dim=-1).max() > 1e-4  # bidirectional: it does
    assert (b1 - c1)[:, :-1].abs().max() > 1e-4  # the outputs really differ
    # padding stays invisible under bidirectional attention
    ids3 = ids.clone()
    ids3[1, :2] = 9
    assert (_states(bidir, ids3, am)[1, 2:] - b1[1, 2:]).abs().max() < 1e-5


def test_bidirectional_model_is_padding_and_batch_invariant():
    texts, images, instr = rows()
    left = build("model.backbone.attention=bidirectional", "model.pooler.type=mean")
    right = build("model.backbone.attention=bidirectional", "model.pooler.type=mean", "model.padding_side=right")
    right.load_state_dict(left.state_dict())
    a = left.encode(texts=texts, images=images, instruction=instr, batch_size=5)
    assert abs(a - left.encode(texts=texts, images=images, instruction=instr, batch_size=1)).max() <= 1e-5
    assert abs(a - right.encode(texts=texts, images=images, instruction=instr, batch_size=3)).max() <= 1e-5


def test_unknown_attention_fails_validation():
    with pytest.raises(ConfigError, match="model.backbone.attention"):
        build("model.backbone.attention=sideways")
