"""Token merging inside tiny Qwen2-VL: mmembed's M-RoPE positions agree with the tokens the LLM sees.

Reference: HF's own ``Qwen2VLModel.get_rope_index`` on the unmerged batch, restricted to the surviving columns.
With nothing merged (keep_ratio 1) the merged path equals the plain HF forward.
"""

from __future__ import annotations

import copy

import pytest
import torch

import mmembed
from mmembed.data.sample import Side
from tests.conftest import make_image
from tests.native_vlms import ROOT

QWEN = ROOT / "recipes/tiny/qwen2vl.yaml"


@pytest.fixture(scope="module")
def model():
    return mmembed.build_model(QWEN, ["model.merge={type: aim, keep_ratio: 0.5}"]).eval()


def _batch(model, side):
    model.processor.padding_side = side
    imgs = [make_image(i, size=s) for i, s in enumerate([(100, 70), (64, 64), (112, 112)])]
    sides = [
        Side(text="a red circle", images=[]),
        Side(instruction="Represent the given image.", text=None, images=[imgs[0]]),
        Side(text="two <image> and <image> compare them", images=[imgs[1], imgs[2]]),
    ]
    return model.processor(sides)


@pytest.mark.parametrize("side", ["left", "right"])
def test_merged_positions_equal_hf_rope_index_of_the_survivors(model, side):
    batch = _batch(model, side)
    bb = model.backbone
    with torch.no_grad():
        sp = bb.splice(batch, model.visual(batch))
    mask, pos, source = sp.attention_mask, sp.position_ids, sp.source
    ref, _ = bb.model.get_rope_index(
        batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"], None, batch["attention_mask"]
    )  # (3, B, L): HF's positions of the unmerged sequence
    n_img = batch["input_ids"] == bb.image_token_id
    assert mask.shape[1] < batch["input_ids"].shape[1] and int(mask.sum()) < int(batch["attention_mask"].sum())
    kept_img = 0
    for b in range(mask.shape[0]):
        cols = source[b][mask[b].bool()]
        assert torch.equal(pos[:, b][:, mask[b].bool()], ref[:, b, cols]), f"row {b}"
        kept_img += int(n_img[b, cols].sum())
        # every text token survives, in order
        text_cols = (batch["attention_mask"][b].bool() & ~n_img[b]).nonzero().flatten()
        assert torch.equal(cols[~n_img[b, cols]], text_cols)
    expected = sum(model.merge.num_tokens(int(g.prod()) // 4) for g in batch["image_grid_thw"])
    assert kept_img == expected  # 2x2 spatial merge, then keep_ratio 0.5 per image
    with torch.no_grad():
        emb = model(batch)
    assert emb.shape == (3, 64) and torch.isfinite(emb).all()


def test_keep_everything_equals_the_plain_forward(model):
    full = copy.deepcopy(model)
    full.merge.keep_ratio = 1.0
    plain = mmembed.build_model(QWEN).eval()
    plain.load_state_dict(model.state_dict())
    batch = _batch(model, "left")
    with torch.no_grad():
        a, b = full(batch), plain(batch)
    assert float((a - b).abs().max()) <= 1e-5
