"""Native VLM backbones with the built-in projector replaced by an mmembed connector, and with in-LLM pruning.

References are independent of mmembed's splicing: the transformers model's own forward (HF processor expansion,
HF ``get_rope_index`` for Qwen2-VL) with the same visual module put in place of its projector/merger.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import mmembed
from mmembed.config import ConfigError
from mmembed.data.sample import Side
from tests.conftest import make_image
from tests.native_vlms import ROOT

QWEN = ROOT / "recipes/tiny/qwen2vl.yaml"
LLAVA = ROOT / "recipes/tiny/llava.yaml"
NEXT = [
    "model.backbone.config.model_type=llava_next",
    "model.backbone.config.image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]]",
]
QWEN25 = [
    "model.backbone.config.model_type=qwen2_5_vl",
    "model.backbone.config.vision_config={depth: 2, hidden_size: 32, intermediate_size: 64, out_hidden_size: 64, "
    "num_heads: 2, patch_size: 14, spatial_merge_size: 2, temporal_patch_size: 2, window_size: 56, "
    "fullatt_block_indexes: [1]}",
]
FAMILIES = {
    "qwen2_vl": (QWEN, []),
    "qwen2_5_vl": (QWEN, QWEN25),
    "llava": (LLAVA, []),
    "llava_next": (LLAVA, NEXT),
}


def _sides():
    imgs = [make_image(i, size=s) for i, s in enumerate([(100, 70), (64, 64), (90, 120)])]
    return [
        Side(instruction="Represent the given text.", text="a red circle on the left", images=[]),
        Side(instruction="Represent the given image.", text=None, images=[imgs[0]]),
        Side(text="two <image> and <image> compare them", images=[imgs[1], imgs[2]]),
    ]


def _build(family: str, *extra: str, normalize: bool = False):
    recipe, over = FAMILIES[family]
    torch.manual_seed(0)
    return mmembed.build_model(recipe, [*over, *extra, f"model.normalize={str(normalize).lower()}"]).eval()


class _Reference(nn.Module):
    """The HF projector/merger slot filled with the same connector, called as the HF model calls its own."""

    def __init__(self, connector: nn.Module, units: int) -> None:
        super().__init__()
        self.connector, self.units = connector, units

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.units:  # Qwen: (N_patches, D_v) -> 2x2 units (N_patches/4, 4 D_v) -> connector
            return self.connector(x.reshape(1, -1, self.units * x.shape[-1]), (0, 0))[0]
        return self.connector(x, (0, 0))


def _hf_last_token(model, batch) -> torch.Tensor:
    """Last-token state of the HF model's own forward, its projector/merger slot replaced by the model's connector."""
    bb = model.backbone
    ref = copy.deepcopy(bb.base_model())
    if hasattr(ref, "visual"):
        ref.visual.merger = _Reference(copy.deepcopy(model.connector), 4)
    else:
        ref.multi_modal_projector = _Reference(copy.deepcopy(model.connector), 0)
    kwargs = {k: batch[k] for k in bb.model_keys if k in batch}
    hidden = ref(**kwargs, use_cache=False).last_hidden_state
    mask = batch["attention_mask"]
    last = mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)  # last real column, either padding side
    return hidden[torch.arange(hidden.shape[0]), last]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_mlp_connector_in_place_of_the_projector_equals_the_hf_forward(family, side):
    model = _build(family, "model.connector={type: mlp}", f"model.padding_side={side}")
    bb = model.backbone
    inner = bb.base_model()
    assert model.connector is not None and model.visual.connector is model.connector  # used, not copied
    keys = model.state_dict().keys()
    assert any(k.startswith("connector.") for k in keys)
    assert not any("multi_modal_projector" in k or "merger" in k for k in keys), "the built-in projector is gone"
    assert not any(k.startswith("backbone.") and ".connector." in k for k in keys), "registered once"
    if hasattr(inner, "visual"):
        assert model.connector.proj[0].in_features == 4 * 32  # 2x2 merge units of the 32-wide ViT
    batch = model.processor(_sides())
    with torch.no_grad():
        ours = model(batch)
        ref = _hf_last_token(model, batch)
    assert float((ours - ref).abs().max()) <= 1e-5


def test_qwen_connector_positions_equal_hf_rope_index():
    model = _build("qwen2_vl", "model.connector={type: mlp}")
    batch = model.processor(_sides())
    bb = model.backbone
    with torch.no_grad():
        sp = bb.splice(batch, model.visual(batch))
    ref, _ = bb.base_model().get_rope_index(
        batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"], None, batch["attention_mask"]
    )
    assert torch.equal(sp.attention_mask, batch["attention_mask"])
    valid = batch["attention_mask"].bool()
    assert torch.equal(sp.position_ids[:, valid], ref[:, valid])


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_a_connector_that_changes_the_token_count(family):
    pool = "{type: pool_adapter, pool_size: 2, mode: adaptive}"
    model = _build(family, f"model.connector={pool}")
    batch = model.processor(_sides())
    bb = model.backbone
    with torch.no_grad():
        sp = bb.splice(batch, model.visual(batch))
        emb = model(batch)
    assert torch.isfinite(emb).all() and emb.shape == (3, 64)
    assert sp.visual.sum(dim=1).tolist() == [0, 4, 8]  # p*p = 4 tokens per image
    valid = sp.attention_mask.bool()
    for b in range(3):
        pos = sp.position_ids[:, b][:, valid[b]]
        vis = sp.visual[b][valid[b]]
        text = pos[:, ~vis]
        assert (text[0] == text[1]).all() and (text[0] == text[2]).all()
        assert (torch.diff(text[0]) > 0).all(), "text positions increase"
        if family == "qwen2_vl" and b == 1:  # <|vision_start|> at 0, a 2x2 grid at 1, <|vision_end|> at 1 + 2
            img = pos[:, vis]
            assert img.tolist() == [[1, 1, 1, 1], [1, 1, 2, 2], [1, 2, 1, 2]]
            assert text[0, :2].tolist() == [0, 3]
        if family == "llava":
            assert torch.equal(pos[0], torch.arange(pos.shape[1])), "1-D RoPE: consecutive positions"


def test_connector_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"model\.connector.*count"):
        _build("llava_next", "model.connector={type: pool_adapter, pool_size: 2}")
    with pytest.raises(ConfigError, match=r"model\.connector\.mode"):
        _build("qwen2_vl", "model.connector={type: pool_adapter, pool_size: 2}")
    with pytest.raises(ConfigError, match=r"model\.vision"):
        _build("qwen2_vl", "model.vision={type: timm, name: vit_tiny_patch16_224, pretrained: false}")


@pytest.mark.parametrize("family", ["qwen2_vl", "llava", "llava_next"])
def test_prune_keeping_everything_equals_the_plain_forward_and_pruning_drops_tokens(family):
    plain = _build(family)
    keep = _build(family, "model.prune={type: aim, schedule: [1.0]}")
    prune = _build(family, "model.prune={type: aim, schedule: [0.5]}")
    batch = plain.processor(_sides())
    with torch.no_grad():
        a, b, c = plain(batch), keep(batch), prune(batch)
        hidden, attn, pool = prune.backbone(batch, prune.visual(batch), pruner=prune.prune)
    assert float((a - b).abs().max()) <= 1e-5
    assert torch.isfinite(c).all() and float((a - c).abs().max()) > 1e-4
    n_img = (batch["input_ids"] == prune.backbone.image_token_id).sum(dim=1)
    assert torch.equal(batch["attention_mask"].sum(dim=1) - attn.sum(dim=1), n_img - torch.round(n_img * 0.5).long())


def test_aim_on_qwen_merges_then_prunes():
    model = _build("qwen2_vl", "model.merge={type: aim, keep_ratio: 0.5}", "model.prune={type: aim, schedule: [0.5]}")
    batch = model.processor(_sides())
    with torch.no_grad():
        emb = model(batch)
        _, attn, _ = model.backbone(batch, model.visual(batch), pruner=model.prune)
    assert torch.isfinite(emb).all()
    assert int(attn.sum()) < int(batch["attention_mask"].sum())


def test_connector_model_saves_and_reloads(tmp_path):
    model = _build("qwen2_vl", "model.connector={type: mlp}", normalize=True)
    sides = _sides()
    texts = [s.text for s in sides]
    images = [s.images or None for s in sides]
    emb = model.encode(texts=texts, images=images, instruction="Represent the given input.")
    again = mmembed.load(model.save(tmp_path / "m")).encode(
        texts=texts, images=images, instruction="Represent the given input."
    )
    np.testing.assert_array_equal(emb, again)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_freeze_vision_freezes_the_native_tower_and_keeps_the_connector_trainable(family):
    from mmembed.config import TrainCfg
    from mmembed.train.setup import prepare_model

    model = _build(family, "model.connector={type: mlp}")
    prepare_model(model, TrainCfg(freeze=["vision"]))
    tower = model.backbone.vision_tower()
    assert all(not p.requires_grad for p in tower.parameters())
    assert all(p.requires_grad for p in model.connector.parameters())
    assert model.backbone.language_model().embed_tokens.weight.requires_grad
