"""``mmembed export``: sentence-transformers and transformers load the export and embed as mmembed does.

The native model is the tiny Qwen2-VL recipe with VLM2Vec's DoRA adapters applied and their weights randomly
perturbed (a training run needs a DeepSpeed subprocess, ~30 s; the exported weights are the same merged kind),
then merged as mmembed's export does (``mmembed.train.setup.merge_lora``).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import mmembed
from mmembed.export import ExportError, export_model
from tests.conftest import ROOT, make_image

PROMPTS = "model.prompts={query: 'Find the image that matches.', document: 'Represent the document.'}"
TOL = 1e-5


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory):
    from mmembed.train.setup import apply_lora, merge_lora

    torch.manual_seed(0)
    model = mmembed.build_model(ROOT / "recipes/tiny/qwen2vl.yaml", [PROMPTS]).eval()
    lora = {"r": 4, "alpha": 16, "dropout": 0.0, "use_dora": True, "init": "gaussian"}
    apply_lora(model, {**lora, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                p.add_(torch.randn_like(p) * 0.05)
    merge_lora(model)
    return model.save(tmp_path_factory.mktemp("native") / "model")


@pytest.fixture(scope="module")
def native_export(native_dir, tmp_path_factory):
    return export_model(native_dir, tmp_path_factory.mktemp("exp") / "st", to="sentence-transformers")


def _rows():
    imgs = [make_image(i, size=(40 + 8 * i, 64 - 4 * i)) for i in range(3)]
    texts = ["a red circle on the left", "what color is the object?", "  x  y "]
    return texts, imgs


def _max(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def test_sentence_transformers_encode_equals_mmembed(native_dir, native_export):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(native_export), device="cpu")
    model = mmembed.load(native_dir)
    texts, imgs = _rows()
    both = [{"image": i, "text": t} for i, t in zip(imgs, texts)]
    inline = ["<image> what color?", "left <image> right", "<image>"]
    assert st.similarity_fn_name == "cosine" and st.prompts["query"] == "Find the image that matches."
    diffs = {
        "text": _max(model.encode(texts=texts), st.encode(texts)),
        "image": _max(model.encode(images=imgs), st.encode(imgs)),
        "image+text": _max(model.encode(texts=texts, images=imgs), st.encode(both)),
        "inline placeholder": _max(
            model.encode(texts=inline, images=imgs), st.encode([{"image": i, "text": t} for i, t in zip(imgs, inline)])
        ),
        "query text": _max(model.encode_query(texts=texts), st.encode_query(texts)),
        "query image": _max(model.encode_query(images=imgs), st.encode_query(imgs)),
        "query image+text": _max(model.encode_query(texts=texts, images=imgs), st.encode_query(both)),
        "document image+text": _max(model.encode_document(texts=texts, images=imgs), st.encode_document(both)),
        "prompt=": _max(model.encode(texts=texts, prompt="Say it."), st.encode(texts, prompt="Say it.")),
    }
    assert _max(st.encode_query(texts), st.encode(texts)) > 1e-3, "the saved query prompt must reach the model"
    print("max abs diff:", diffs)
    assert max(diffs.values()) <= TOL, diffs


def test_transformers_loads_the_export_and_its_last_token_is_the_embedding(native_dir, native_export):
    import transformers

    model = mmembed.load(native_dir)
    model.cfg.normalize = False  # the unnormalized embedding: the last token's hidden state
    texts, imgs = _rows()
    want = model.encode(texts=texts, images=imgs, prompt="Find it.")
    hf, info = transformers.AutoModel.from_pretrained(native_export, output_loading_info=True)
    assert type(hf).__name__ == "Qwen2VLModel" and not info["missing_keys"] and not info["unexpected_keys"]
    full, info = transformers.Qwen2VLForConditionalGeneration.from_pretrained(native_export, output_loading_info=True)
    assert set(info["missing_keys"]) <= {"lm_head.weight"} and not info["unexpected_keys"]
    proc = transformers.AutoProcessor.from_pretrained(native_export)
    messages = [
        [
            {"role": "system", "content": [{"type": "text", "text": "Find it."}]},
            {"role": "user", "content": [{"type": "image", "image": i}, {"type": "text", "text": t}]},
        ]
        for i, t in zip(imgs, texts)
    ]
    kw = {"padding": True, "padding_side": "left"}  # mmembed's model.padding_side: the last column is the last token
    batch = proc.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_tensors="pt", processor_kwargs=kw
    )
    with torch.inference_mode():
        hidden = hf.eval()(**batch).last_hidden_state
    got = hidden[:, -1].numpy()
    print("max abs diff (HF last token):", _max(want, got))
    assert _max(want, got) <= TOL


def test_composed_model_through_the_mmembed_module(tiny_model, tmp_path):
    from sentence_transformers import SentenceTransformer

    tiny_model.cfg.prompts = {"query": "Represent the given input.", "document": "A document."}
    src = tiny_model.save(tmp_path / "composed")
    with pytest.raises(ExportError, match=r"backbone.type=hf_causal_lm is a composed model"):
        export_model(src, tmp_path / "hf", to="hf")
    out = export_model(src, tmp_path / "st", to="sentence-transformers")
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        SentenceTransformer(str(out), device="cpu")
    st = SentenceTransformer(str(out), device="cpu", trust_remote_code=True)
    model = mmembed.load(src)
    texts, imgs = _rows()
    both = [{"image": i, "text": t} for i, t in zip(imgs, texts)]
    diffs = {
        "text": _max(model.encode(texts=texts), st.encode(texts)),
        "image": _max(model.encode(images=imgs), st.encode(imgs)),
        "query image+text": _max(model.encode_query(texts=texts, images=imgs), st.encode_query(both)),
        "document text": _max(model.encode_document(texts=texts), st.encode_document(texts)),
    }
    print("max abs diff (composed):", diffs)
    assert max(diffs.values()) <= TOL, diffs
    again = SentenceTransformer(str(out), device="cpu", trust_remote_code=True)  # its save/load round trip
    st.save(str(tmp_path / "resaved"))
    resaved = SentenceTransformer(str(tmp_path / "resaved"), device="cpu", trust_remote_code=True)
    np.testing.assert_array_equal(again.encode(texts), resaved.encode(texts))


def test_missing_mmembed_names_the_install_command(tiny_model, tmp_path, monkeypatch):
    import sentence_transformers.util.environment as env
    from sentence_transformers import SentenceTransformer

    out = export_model(tiny_model.save(tmp_path / "m"), tmp_path / "st", to="sentence-transformers")
    real = env.get_installed_version
    monkeypatch.setattr(env, "get_installed_version", lambda name: None if name == "mmembed" else real(name))
    with pytest.raises(ImportError, match=r"pip install mmembed\[st\]"):
        SentenceTransformer(str(out), device="cpu", trust_remote_code=True)


def test_a_connector_swap_is_refused_for_hf_and_wrapped_for_st(tmp_path):
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    over = ["model.connector={type: pool_adapter, pool_size: 2, mode: adaptive}"]
    model = mmembed.build_model(ROOT / "recipes/tiny/qwen2vl.yaml", over).eval()
    src = model.save(tmp_path / "m")
    msg = r"connector.type=pool_adapter replaces Qwen2VLForConditionalGeneration's merger; --to hf cannot express it"
    with pytest.raises(ExportError, match=msg):
        export_model(src, tmp_path / "hf", to="hf")
    from mmembed.export.cli import main

    assert main([str(src), str(tmp_path / "hf"), "--to", "hf"]) == 2
    assert main([str(src), str(tmp_path / "st"), "--to", "sentence-transformers"]) == 0
    st = SentenceTransformer(str(tmp_path / "st"), device="cpu", trust_remote_code=True)
    texts, imgs = _rows()
    both = [{"image": i, "text": t} for i, t in zip(imgs, texts)]
    assert _max(mmembed.load(src).encode_query(texts=texts, images=imgs), st.encode_query(both)) <= TOL


def test_the_script_exports_without_deepspeed(native_dir, tmp_path):
    wrapper = (
        f"import sys, runpy\nsys.argv = ['x', {str(native_dir)!r}, {str(tmp_path / 'hf')!r}, '--to', 'hf']\n"
        "try:\n    runpy.run_path('tools/export_model.py', run_name='__main__')\nexcept SystemExit as e:\n"
        "    assert e.code == 0, e.code\nassert not any(m.startswith('deepspeed') for m in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", wrapper], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "hf" / "modules.json").is_file() and (tmp_path / "hf" / "chat_template.jinja").is_file()
