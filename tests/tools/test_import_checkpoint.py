"""tools/import_checkpoint.py: a VLM2Vec-style release (HF base + peft LoRA adapter dir) -> mmembed model dir."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import torch
import torch.nn.functional as F

import mmembed
from mmembed.backbones.native import VLM2VEC_LORA_TARGETS
from tests.conftest import make_image
from tests.native_vlms import ROOT, tiny_hf


def _tool():
    spec = importlib.util.spec_from_file_location("import_checkpoint", ROOT / "tools" / "import_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_vlm2vec_lora_release_imports_with_the_adapter_merged(tmp_path):
    from peft import LoraConfig, get_peft_model

    hf, proc, _ = tiny_hf("qwen2_vl", seed=1)
    base = tmp_path / "base"
    hf.save_pretrained(base)
    proc.save_pretrained(base)
    # the release: a DoRA adapter on the ForConditionalGeneration (VLM2Vec's targets), saved on its own
    torch.manual_seed(2)
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=VLM2VEC_LORA_TARGETS, use_dora=True, init_lora_weights=False)
    peft_model = get_peft_model(type(hf).from_pretrained(base), cfg)
    release = tmp_path / "release"
    peft_model.save_pretrained(release)
    assert json.loads((release / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    merged = peft_model.merge_and_unload().eval()

    out = _tool().main([str(release), str(tmp_path / "mm"), "--layout", "mmembed", "--image-backend", "torchvision"])
    assert out == 0
    model = mmembed.load(tmp_path / "mm")
    assert model.processor.padding_side == "left" and model.cfg.pooler["type"] == "last_token"

    img = make_image(4, size=(70, 50))
    texts = ["a red circle</s>", "<|vision_start|><|image_pad|><|vision_end|>what color?</s>"]
    inputs = proc(text=texts, images=[img], padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        ref = F.normalize(merged.model(**inputs).last_hidden_state[:, -1], dim=-1)
        plain = F.normalize(hf.model(**inputs).last_hidden_state[:, -1], dim=-1)
    emb = model.encode(texts=["a red circle", "<image>what color?"], images=[None, img], batch_size=2)
    assert np.abs(emb - ref.numpy()).max() <= 1e-5
    assert np.abs(emb - plain.numpy()).max() > 1e-3, "the adapter must change the embedding"
