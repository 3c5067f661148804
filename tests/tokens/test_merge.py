"""Token merging before the LLM (AIM / ToMe bipartite soft matching)."""

from __future__ import annotations

import pytest
import torch

from mmembed.config import ConfigError, load_recipe
from mmembed.tokens.merge import AIMMerger, merge_tokens, merged_count
from tests.conftest import TINY_RECIPE
from tests.tiny_models import build, rows


def test_keep_ratio_one_is_the_identity():
    x = torch.randn(3, 16, 8)
    out, pos = merge_tokens(x, 1.0)
    assert torch.equal(out, x) and torch.equal(pos, torch.arange(16).expand(3, 16))


def test_identical_tokens_keep_their_value_and_counts_are_deterministic():
    x = torch.randn(2, 1, 8).expand(2, 20, 8).contiguous()
    for ratio in (0.5, 0.25, 0.1):
        out, pos = merge_tokens(x, ratio)
        assert out.shape[1] == merged_count(20, ratio) == AIMMerger(keep_ratio=ratio).num_tokens(20)
        assert torch.allclose(out, x[:, :1].expand_as(out), atol=1e-6)
        assert (pos[:, 1:] > pos[:, :-1]).all()  # survivors in original (raster) order


def test_similar_tokens_merge_first_and_means_are_unweighted():
    # pairs (0,1) nearly equal, others orthogonal-ish: the first merge must average 0 into 1
    x = torch.eye(8)[None] * 5.0
    x[0, 0] = x[0, 1] + 0.01
    out, pos = merge_tokens(x, 7 / 8)
    assert out.shape == (1, 7, 8) and 0 not in pos[0].tolist()
    assert torch.allclose(out[0, 0], (x[0, 0] + x[0, 1]) / 2)


@pytest.mark.parametrize("ratio", [0, -0.5, 1.5])
def test_keep_ratio_outside_range_fails_validation_naming_the_key(ratio):
    with pytest.raises(ConfigError) as e:
        load_recipe(TINY_RECIPE, [f"model.merge={{type: aim, keep_ratio: {ratio}}}"])
    assert e.value.key == "model.merge.keep_ratio" and "(0, 1]" in e.value.message


def test_model_expands_placeholders_to_the_merged_count_and_stays_invariant():
    model = build("model.merge={type: aim, keep_ratio: 0.25}")
    assert model.processor.image_tokens == 4  # 16 connector tokens -> 4
    texts, images, instr = rows()
    a = model.encode(texts=texts, images=images, instruction=instr, batch_size=5)
    assert abs(a - model.encode(texts=texts, images=images, instruction=instr, batch_size=1)).max() <= 1e-5
    full = build()
    full.load_state_dict(model.state_dict(), strict=True)
    b = full.encode(texts=texts, images=images, instruction=instr, batch_size=5)
    assert abs(a[0] - b[0]).max() <= 1e-6 and abs(a[1] - b[1]).max() > 1e-4  # text rows same, image rows change
