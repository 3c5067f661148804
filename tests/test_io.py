"""Save/load: the self-describing directory, safetensors only, strict, offline, identical embeddings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import mmembed
from mmembed.io import CONFIG_NAME, WEIGHTS_NAME
from tests.conftest import TINY_RECIPE, make_image

VISION_SWAPS = {
    "timm": [],
    "open_clip": [
        "model.vision={type: open_clip, "
        "vision_cfg: {image_size: 32, layers: 2, width: 64, head_width: 32, patch_size: 8}}"
    ],
    "hf_clip": [
        "model.vision={type: hf, layer: -2, config: {model_type: clip_vision_model, hidden_size: 32, "
        "intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, image_size: 32, patch_size: 8}}"
    ],
    "hf_siglip": [
        "model.vision={type: hf, config: {model_type: siglip_vision_model, hidden_size: 32, "
        "intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, image_size: 32, patch_size: 8}}"
    ],
}


def _inputs():
    return (
        ["a red circle", None, "two images: <image> and <image>", "plain text"],
        [None, make_image(1), [make_image(2), make_image(3)], None],
    )


@pytest.mark.parametrize("vision", list(VISION_SWAPS))
def test_save_load_gives_identical_embeddings(vision, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model = mmembed.build_model(TINY_RECIPE, VISION_SWAPS[vision] + ["model.embed_dim=32"]).eval()
    texts, images = _inputs()
    before = model.encode(texts=texts, images=images, instruction="Represent the input.")
    assert before.shape == (4, 32)
    out = model.save(tmp_path / "model")
    files = sorted(p.name for p in out.iterdir())
    assert files == ["README.md", "backbone", CONFIG_NAME, WEIGHTS_NAME, "tokenizer"]
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt")) and not list(out.rglob("*.pkl"))
    meta = json.loads((out / CONFIG_NAME).read_text())
    assert meta["format_version"] == 2 and meta["embed_dim"] == 32 and meta["similarity"] == "cosine"
    assert {"torch", "transformers", "mmembed"} <= set(meta["versions"])
    assert meta["preprocess"]["size"] == model.vision.image_size
    assert meta["model"]["backbone"]["pretrained"] is False and "config" not in meta["model"]["backbone"]
    keys = load_file(out / WEIGHTS_NAME).keys()
    assert {k.split(".")[0] for k in keys} == {"vision", "connector", "backbone", "proj"}
    loaded = mmembed.load(out)
    after = loaded.encode(texts=texts, images=images, instruction="Represent the input.")
    np.testing.assert_array_equal(before, after)


def test_load_is_strict_and_checks_the_format(tiny_model, tmp_path):
    out = tiny_model.save(tmp_path / "m")
    weights = load_file(out / WEIGHTS_NAME)
    weights.pop(next(k for k in weights if k.startswith("connector.")))
    save_file(weights, out / WEIGHTS_NAME)
    with pytest.raises(RuntimeError, match="connector"):
        mmembed.load(out)
    meta = json.loads((out / CONFIG_NAME).read_text())
    meta["format_version"] = 99
    (out / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version 99"):
        mmembed.load(out)
    with pytest.raises(FileNotFoundError, match="not an mmembed model directory"):
        mmembed.load(tmp_path)


def test_save_overwrites_atomically(tiny_model, tmp_path):
    out = tiny_model.save(tmp_path / "m")
    (out / "stale.txt").write_text("old")
    tiny_model.save(tmp_path / "m")
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folders left behind


def test_prompts_travel_with_the_model(tiny_model, tmp_path):
    loaded = mmembed.load(tiny_model.save(tmp_path / "m"))
    assert loaded.cfg.prompts == {"query": "Represent the given input."}
    a = loaded.encode(texts=["a cat"], instruction="query")
    b = loaded.encode(texts=["a cat"], instruction="Represent the given input.")
    np.testing.assert_array_equal(a, b)


def test_inference_path_never_imports_training_libraries(tiny_model, tmp_path):
    import subprocess
    import sys

    out = tiny_model.save(tmp_path / "m")
    code = (
        "import sys, mmembed; m = mmembed.load(sys.argv[1]); m.encode(texts=['a'], images=[None]); "
        "bad = [k for k in ('deepspeed', 'webdataset', 'peft', 'mmembed.train', 'mmembed.data', 'mmembed.data.wds', "
        "'mmembed.data.mixing', 'mmembed.data.manifest', 'mmembed.eval') if k in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("recipe", ["composed.yaml", "qwen2vl.yaml", "late_fusion.yaml"])
def test_meta_device_load_equals_the_plain_build_bit_for_bit(recipe, tmp_path):
    """``mmembed.load`` builds on the meta device and assigns the safetensors tensors; the result must equal a
    model built normally (random init) with the same weights copied in: every parameter and buffer, and encode."""
    from safetensors.torch import load_model

    from mmembed.build import build_from_cfg
    from mmembed.config import model_cfg_from_dict
    from mmembed.io import resolve_model_dir

    torch.manual_seed(0)
    out = mmembed.build_model(TINY_RECIPE.parent / recipe).save(tmp_path / "m")
    fast = mmembed.load(out)
    _, model_dict, weights = resolve_model_dir(out)
    plain = build_from_cfg(model_cfg_from_dict(model_dict)).eval()
    load_model(plain, str(weights), strict=True)
    a, b = dict(fast.named_buffers()), dict(plain.named_buffers())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "buffers differ"
    sa, sb = fast.state_dict(), plain.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not any(p.is_meta for p in fast.parameters()) and not any(t.is_meta for t in fast.buffers())
    texts, images = _inputs()
    np.testing.assert_array_equal(fast.encode(texts=texts, images=images), plain.encode(texts=texts, images=images))
    half = mmembed.load(out, dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="dtype must be one of"):
        mmembed.load(out, dtype="int3")


def test_tied_parameters_are_found_and_retied():
    from mmembed.build import _set, _shared_parameters

    m = torch.nn.Sequential(torch.nn.Embedding(4, 3), torch.nn.Linear(3, 4, bias=False))
    m[1].weight = m[0].weight
    assert _shared_parameters(m) == {"1.weight": "0.weight"}
    new = torch.nn.Parameter(torch.ones(4, 3))
    _set(m, "0.weight", new)
    _set(m, "1.weight", m.get_parameter("0.weight"))
    assert m[1].weight is m[0].weight is new
