"""Proof for the native VLM backbones: mmembed's embedding is the transformers model's own last-token state.

For Qwen2-VL, Qwen2.5-VL, LLaVA and LLaVA-Next (tiny random-init checkpoints saved in the HF layout and loaded by
``backbone.name=<dir>``), with ``last_token`` pooling and no connector swap: the processor writes exactly the HF
processor's input for the VLM2Vec layout (``<image> instruction text</s>``), and the embedding equals
``Model.model(**hf_inputs).last_hidden_state`` at the last real token (max abs diff <= 1e-5, fp32) on text-only,
image-only, image+text and two-image rows, with left and right padding; batch size does not change it; save ->
load gives identical embeddings; the processor's ``split`` (what GradCache uses) cuts native batches
(flattened Qwen patches by ``image_grid_thw``, LLaVA-Next tiles) into chunks whose embeddings equal the full
batch's rows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mmembed
from tests.native_vlms import FAMILIES, expected_texts, mixed_rows


def _btype(family: str) -> str:
    return "qwen2_vl" if family.startswith("qwen") else "llava"


def _build(path, btype, side, normalize=False):
    recipe = {
        "model": {
            "backbone": {"type": btype, "name": str(path)},
            "pooler": {"type": "last_token"},
            "normalize": normalize,
            "padding_side": side,
        }
    }
    return mmembed.build_model(recipe).eval()


def _reference(hf, proc, texts, imgs, side):
    inputs = proc(text=texts, images=imgs, padding=True, padding_side=side, return_tensors="pt")
    with torch.no_grad():
        hidden = hf.model(**inputs).last_hidden_state  # (B, L, d): the HF model's own forward
    mask = inputs["attention_mask"]
    last = torch.full((mask.shape[0],), mask.shape[1] - 1) if side == "left" else mask.sum(1) - 1
    return inputs, hidden[torch.arange(mask.shape[0]), last]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_embedding_equals_the_hf_models_last_token_state(family, side, hf_checkpoint, tmp_path):
    path, hf, proc = hf_checkpoint(family)
    model = _build(path, _btype(family), side)
    sides, imgs = mixed_rows()
    texts = expected_texts(model.backbone.image_text)
    inputs, ref = _reference(hf, proc, texts, imgs, side)
    batch = model.processor(sides)
    assert torch.equal(batch["input_ids"], inputs["input_ids"]), "processor output differs from the HF processor's"
    assert torch.equal(batch["attention_mask"], inputs["attention_mask"].long())
    with torch.no_grad():
        emb = model(batch)
    assert emb.shape == ref.shape
    assert float((emb - ref).abs().max()) <= 1e-5
    # the rows differ (a constant or zero embedding would not prove anything)
    assert float(torch.cdist(ref, ref).fill_diagonal_(1.0).min()) > 1e-3

    model.cfg.normalize = True
    with torch.no_grad():
        assert float((model(batch) - F.normalize(ref, dim=-1)).abs().max()) <= 1e-5

    # batch-size invariance through encode (rows regrouped by length, padded differently)
    kw = {
        "texts": [s.text for s in sides],
        "images": [s.images or None for s in sides],
        "instruction": [s.instruction for s in sides],
    }
    one, six = model.encode(**kw, batch_size=1), model.encode(**kw, batch_size=6)
    assert np.abs(one - six).max() <= 1e-5
    assert np.abs(six - F.normalize(ref, dim=-1).numpy()).max() <= 1e-5

    # save -> load (offline, from the model directory's backbone/ and processor/) -> identical embeddings
    loaded = mmembed.load(model.save(tmp_path / "m"))
    assert (tmp_path / "m" / "processor").is_dir() and (tmp_path / "m" / "backbone" / "config.json").is_file()
    np.testing.assert_array_equal(loaded.encode(**kw, batch_size=6), six)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next"])
def test_split_batch_chunks_embed_like_the_full_batch(family, hf_checkpoint):
    path, _, _ = hf_checkpoint(family)
    model = _build(path, _btype(family), "left")
    sides, _ = mixed_rows()
    batch = model.processor(sides)
    chunks = model.processor.split(batch, 2)
    assert len(chunks) == 3
    assert torch.equal(torch.cat([c["pixel_values"] for c in chunks if "pixel_values" in c]), batch["pixel_values"])
    if family == "qwen2_vl":  # flattened patches: sliced by t*h*w of each image's grid
        grids = [c["image_grid_thw"] for c in chunks if "image_grid_thw" in c]
        assert torch.equal(torch.cat(grids), batch["image_grid_thw"])
        assert len({int(g.prod(-1).sum()) for g in grids}) > 1, "the images must have different patch counts"
        for c in chunks:
            n = int(c["image_grid_thw"].prod(-1).sum()) if "image_grid_thw" in c else 0
            assert c.get("pixel_values", torch.empty(0)).shape[0] == n
    with torch.no_grad():
        full = model(batch)
        parts = torch.cat([model(c) for c in chunks])
    assert float((full - parts).abs().max()) <= 1e-5
