"""The native ``llava_onevision`` backbone: mmembed's embedding is the transformers model's own last-token state.

A tiny random-init LLaVA-OneVision checkpoint (SigLIP tiles, any-res up to 2x2 tiles with unpadding, ``anyres_max_1``
interpolation and ``image_newline`` rows; tests/native_vlms.py) loaded by ``backbone.name=<dir>``. References are
transformers' own forward on the HF processor's output, and the same forward with mmembed's connector in the
projector's slot. Also pruning, GradCache against the plain step, LoRA targets, and save/load.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmembed
from mmembed.backbones.native import VLM2VEC_LORA_TARGETS
from mmembed.config import ConfigError
from mmembed.data.sample import Side
from mmembed.train.setup import apply_lora
from tests.conftest import make_image
from tests.native_vlms import SIZES, expected_texts, gradcache_and_plain, mixed_rows


@pytest.fixture(scope="module")
def ckpt(hf_checkpoint):
    return hf_checkpoint("llava_onevision")


def _rows():
    sides, imgs = mixed_rows()
    return sides, expected_texts("<image>"), imgs


def _build(path, side="left", normalize=False, **slots):
    model = {"backbone": {"type": "llava_onevision", "name": str(path)}, "pooler": {"type": "last_token"}}
    model.update(normalize=normalize, padding_side=side, **slots)
    torch.manual_seed(0)
    return mmembed.build_model({"model": model}).eval()


def _last(hidden, mask):
    last = mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)  # last real column, either padding side
    return hidden[torch.arange(hidden.shape[0]), last]


@pytest.mark.parametrize("side", ["left", "right"])
def test_embedding_equals_the_hf_models_last_token_state(side, ckpt, tmp_path):
    path, hf, proc = ckpt
    sides, texts, imgs = _rows()
    inputs = proc(text=texts, images=imgs, padding=True, padding_side=side, return_tensors="pt")
    with torch.no_grad():
        ref = _last(hf.model(**inputs).last_hidden_state, inputs["attention_mask"])
    model = _build(path, side)
    batch = model.processor(sides)
    assert torch.equal(batch["input_ids"], inputs["input_ids"]), "processor output differs from the HF processor's"
    n_img = (batch["input_ids"] == 400).sum(dim=1).tolist()
    assert n_img[:2] == [0, 0] and len(set(n_img[2:5])) > 1, "any-res counts vary with the aspect ratio"
    with torch.no_grad():
        emb = model(batch)
    assert float((emb - ref).abs().max()) <= 1e-5  # measured: 0.0
    assert float(torch.cdist(ref, ref).fill_diagonal_(1.0).min()) > 1e-3, "the rows must differ"
    # the spliced path (features cut at the image runs, 1-D positions) with nothing reduced
    for slots in ({"merge": {"type": "aim", "keep_ratio": 1.0}}, {"prune": {"type": "aim", "schedule": [1.0]}}):
        with torch.no_grad():
            out = _build(path, side, **slots)(batch)
        assert float((out - ref).abs().max()) <= 1e-5, slots  # measured: 4.8e-7 left (HF numbers pads), 0.0 right

    kw = {"texts": [s.text for s in sides], "images": [s.images or None for s in sides]}
    kw["instruction"] = [s.instruction for s in sides]
    model.cfg.normalize = True
    one, six = model.encode(**kw, batch_size=1), model.encode(**kw, batch_size=6)
    assert np.abs(one - six).max() <= 1e-5
    assert np.abs(six - F.normalize(ref, dim=-1).numpy()).max() <= 1e-5
    loaded = mmembed.load(model.save(tmp_path / "m"))
    np.testing.assert_array_equal(loaded.encode(**kw, batch_size=6), six)


class _Reference(nn.Module):
    """The projector slot filled with the connector, called on each tile's (N_tiles, N, D_v) features."""

    def __init__(self, connector: nn.Module) -> None:
        super().__init__()
        self.connector = connector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.connector(x, (4, 4))


@pytest.mark.parametrize("side", ["left", "right"])
def test_mlp_connector_in_place_of_the_projector_equals_the_hf_forward(side, ckpt):
    path, _, _ = ckpt
    model = _build(path, side, connector={"type": "mlp"})
    keys = model.state_dict().keys()
    assert any(k.startswith("connector.") for k in keys) and not any("multi_modal_projector" in k for k in keys)
    assert any(k.endswith("image_newline") for k in keys)
    batch = model.processor(_rows()[0])
    ref_model = copy.deepcopy(model.backbone.base_model())
    ref_model.multi_modal_projector = _Reference(copy.deepcopy(model.connector))
    with torch.no_grad():
        ours = model(batch)
        kwargs = {k: batch[k] for k in model.backbone.model_keys if k in batch}
        ref = _last(ref_model(**kwargs, use_cache=False).last_hidden_state, batch["attention_mask"])
    assert float((ours - ref).abs().max()) <= 1e-5  # measured: 0.0
    with pytest.raises(ConfigError, match="token count") as e:
        _build(path, connector={"type": "pool_adapter", "pool_size": 2})
    assert e.value.key == "model.connector"


def test_merging_and_pruning_drop_visual_tokens(ckpt):
    path, _, _ = ckpt
    plain = _build(path)
    batch = plain.processor(_rows()[0])
    merged = _build(path, merge={"type": "aim", "keep_ratio": 0.5})
    pruned = _build(path, prune={"type": "aim", "schedule": [0.5]})
    with torch.no_grad():
        a, b, c = plain(batch), merged(batch), pruned(batch)
        sp = merged.backbone.splice(batch, merged.visual(batch))
        _, attn, _ = pruned.backbone(batch, pruned.visual(batch), pruner=pruned.prune)
    n_img = (batch["input_ids"] == 400).sum(dim=1)
    assert torch.isfinite(b).all() and torch.isfinite(c).all()
    assert float((a - b).abs().max()) > 1e-4 and float((a - c).abs().max()) > 1e-4
    assert int(sp.visual.sum()) < int(n_img.sum())
    assert torch.equal(batch["attention_mask"].sum(dim=1) - attn.sum(dim=1), n_img - torch.floor(n_img * 0.5).long())


def test_gradcache_over_split_batches_equals_the_plain_step(ckpt):
    path, _, _ = ckpt
    model = _build(path, normalize=True).train()
    imgs = [make_image(10 + i, size=s) for i, s in enumerate(SIZES)]
    queries = [Side(text="a red circle"), Side(images=[imgs[0]]), Side(text="<image> and <image>", images=imgs[1:3])]
    queries.append(Side(text="blue"))
    targets = [Side(images=[imgs[3]]), Side(text="a caption"), Side(text="<image> x", images=[imgs[4]]), Side(text="y")]
    qb, tb = model.processor(queries), model.processor(targets)
    chunks = model.processor.split(qb, 2)
    assert [c["batch_num_images"].shape[0] for c in chunks] == [1, 2], "batch_num_images is split per image"
    _, _, grads, ref_grads = gradcache_and_plain(model, qb, tb)
    assert grads.keys() == ref_grads.keys() and any(n.endswith("image_newline") for n in grads)
    # relative to the largest gradient: SigLIP's k_proj biases have an exactly-zero gradient (softmax is shift-
    # invariant), so per-tensor ratios there compare rounding noise (~1e-8)
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    rel = max(float((grads[n] - ref_grads[n]).abs().max()) for n in grads) / scale
    assert scale > 1e-3 and rel <= 1e-5  # measured: 3.1e-7 (abs 2.3e-5 of |g| <= 75)


def test_vlm2vec_lora_targets_hit_the_llm_and_siglip_attention(ckpt):
    path, _, _ = ckpt
    model = _build(path)
    apply_lora(model, {"r": 2, "target_modules": VLM2VEC_LORA_TARGETS, "use_dora": True})
    names = [n for n, m in model.backbone.model.named_modules() if hasattr(m, "lora_A") and n]
    assert any("language_model" in n for n in names)
    assert any("vision_tower" in n and n.endswith("q_proj") for n in names)
    assert not any("multi_modal_projector" in n for n in names)
