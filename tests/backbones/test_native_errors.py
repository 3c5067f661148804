"""Bad input for native VLM backbones fails at start with the key or the row named; LoRA targets per family."""

from __future__ import annotations

import pytest
import torch

import mmembed
from mmembed.backbones.native import VLM2VEC_LORA_TARGETS
from mmembed.config import ConfigError
from mmembed.data.sample import Side
from mmembed.processing import InputError
from mmembed.train.setup import apply_lora
from tests.conftest import make_image
from tests.native_vlms import ROOT

QWEN = ROOT / "recipes/tiny/qwen2vl.yaml"
LLAVA = ROOT / "recipes/tiny/llava.yaml"


def test_min_pixels_above_max_pixels_names_the_key():
    with pytest.raises(ConfigError, match="min_pixels") as e:
        mmembed.build_model(QWEN, ["model.backbone.min_pixels=50000", "model.backbone.max_pixels=3136"])
    assert e.value.key == "model.backbone.min_pixels"


@pytest.mark.parametrize("recipe", [QWEN, LLAVA], ids=["qwen2_vl", "llava"])
def test_processor_model_image_token_mismatch_names_the_key(recipe):
    with pytest.raises(ConfigError, match="image_token_id") as e:
        mmembed.build_model(recipe, ["model.backbone.config.image_token_id=401"])
    assert "do not match" in str(e.value)


def test_connector_with_a_native_backbone_is_refused():
    with pytest.raises(ConfigError, match="model.vision: backbone 'qwen2_vl' has its own vision tower"):
        mmembed.build_model(
            QWEN, ["model.vision={type: timm, name: test_vit, pretrained: false}", "model.connector={type: mlp}"]
        )


@pytest.fixture(scope="module")
def qwen():
    return mmembed.build_model(QWEN).eval()


def test_image_count_differing_from_placeholders_names_the_row(qwen):
    img = make_image(0)
    with pytest.raises(InputError, match=r"row 7: the text has 2 image placeholder"):
        qwen.processor([Side(text="ok"), Side(text="<image> and <image>", images=[img])], rows=[3, 7])
    with pytest.raises(InputError, match="row 1: .*model's own image text"):
        qwen.processor([Side(text="ok"), Side(text="<|vision_start|><|image_pad|><|vision_end|> x", images=[])])


def test_qwen_resolution_bounds_set_the_visual_token_count(qwen):
    small = mmembed.build_model(QWEN, ["model.backbone.max_pixels=3136"]).eval()
    img = make_image(0, size=(200, 200))
    big = qwen.processor([Side(images=[img])])
    few = small.processor([Side(images=[img])])
    tok = qwen.backbone.image_token_id
    assert int((few["input_ids"] == tok).sum()) == 4  # 56x56 px = 2x2 merged patches
    assert int((big["input_ids"] == tok).sum()) == 16  # capped by max_pixels 28*28*16


def _lora_modules(model):
    return [n for n, m in model.backbone.model.named_modules() if hasattr(m, "lora_A") and n]


def test_vlm2vec_lora_targets_per_family(qwen):
    import copy

    q = copy.deepcopy(qwen)
    apply_lora(q, {"r": 2, "target_modules": VLM2VEC_LORA_TARGETS, "use_dora": True})
    names = _lora_modules(q)
    assert any("language_model" in n for n in names)
    assert not any(".visual." in n for n in names), "VLM2Vec's targets do not match the Qwen2-VL ViT (qkv, fc1)"
    llava = mmembed.build_model(LLAVA)
    apply_lora(llava, {"r": 2, "target_modules": VLM2VEC_LORA_TARGETS})
    names = _lora_modules(llava)
    assert any("vision_tower" in n and n.endswith("q_proj") for n in names), "CLIP attention is a VLM2Vec target"
    assert any("language_model" in n for n in names)
    assert not any("multi_modal_projector" in n for n in names)


def test_lora_pattern_matching_nothing_names_the_key(qwen):
    import copy

    with pytest.raises(ConfigError, match="train.lora.target_modules"):
        apply_lora(copy.deepcopy(qwen), {"target_modules": ["no_such_proj"]})


@pytest.mark.parametrize("recipe", [QWEN, LLAVA], ids=["qwen2_vl", "llava"])
def test_text_only_training_batch_still_reaches_the_vision_tower(recipe):
    """Every rank / GradCache chunk must run the same modules: a text-only batch in training gives the vision
    tower (zero) gradients, and the embedding is unchanged."""
    model = mmembed.build_model(recipe)
    batch = model.processor([Side(text="a red circle"), Side(text="blue square")])
    model.eval()
    ref = model(batch).detach()
    model.train()
    emb = model(batch)
    assert torch.allclose(emb, ref, atol=1e-6)
    emb.sum().backward()
    base = model.backbone.model
    tower = base.visual if hasattr(base, "visual") else base.vision_tower
    text_grads = {n: p.grad for n, p in tower.named_parameters() if p.grad is not None}
    assert text_grads and all(float(g.abs().max()) == 0.0 for g in text_grads.values())
    model.zero_grad(set_to_none=True)
    model(model.processor([Side(text="a red circle", images=[make_image(0)])])).sum().backward()
    image_grads = {n for n, p in tower.named_parameters() if p.grad is not None}
    assert set(text_grads) == image_grads, "a text-only batch must touch the same tower parameters as an image batch"
