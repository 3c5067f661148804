"""``--to hf`` for text-only decoder models, and vLLM's pooling runner on the export (docs/export.md, "vLLM").

The fast tests build a tiny text-only Qwen2 (the tiny recipe without vision, head_dim 64 as vLLM's CPU attention
needs) and check sentence-transformers and transformers against mmembed's ``encode``. The slow one runs
``tools/vllm_check.py`` in the interpreter named by ``MMEMBED_VLLM_PYTHON`` (a separate venv with vLLM; the exact
commands are in docs/export.md) and compares vLLM's vectors with mmembed's ``encode`` here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import mmembed
from mmembed.export import ExportError, export_model
from tests.conftest import ROOT, TINY_RECIPE

TOL = 1e-5
VLLM_TOL = 1e-4  # fp32, CPU: vLLM's own kernels (matmul order, RMSNorm, RoPE) against transformers'
PROMPTS = "model.prompts={query: 'Represent the given input.', document: 'A document.'}"
TEXT_ONLY = [
    "model.vision=null",
    "model.connector=null",
    "model.backbone.config.hidden_size=128",
    "model.backbone.config.num_attention_heads=2",
    "model.backbone.config.num_key_value_heads=1",
    "model.backbone.config.intermediate_size=256",
    PROMPTS,
]
TEXTS = ["a red circle on the left", "what color is the object?", "  x  y ", "x", "red " * 200]  # the last: cut


def _tool():
    spec = importlib.util.spec_from_file_location("vllm_check", ROOT / "tools" / "vllm_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _text_model(tmp_path, *extra: str):
    torch.manual_seed(0)
    model = mmembed.build_model(TINY_RECIPE, TEXT_ONLY + list(extra)).eval()
    return model.save(tmp_path / "model")


def _max(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.mark.parametrize("extra", [[], ["model.embed_dim=32"]], ids=["plain", "dense"])
def test_text_only_export_embeds_as_mmembed(extra, tmp_path):
    import transformers
    from sentence_transformers import SentenceTransformer

    src = _text_model(tmp_path, *extra)
    out = export_model(src, tmp_path / "hf", to="hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and not (out / "chat_template.jinja").exists()
    st_cfg = json.loads((out / "config_sentence_transformers.json").read_text())
    assert st_cfg["prompts"] == {"query": "Represent the given input. ", "document": "A document. "}
    model = mmembed.load(src)
    st = SentenceTransformer(str(out), device="cpu")
    diffs = {
        "text": _max(model.encode(texts=TEXTS), st.encode(TEXTS)),
        "query": _max(model.encode_query(texts=TEXTS), st.encode_query(TEXTS)),
        "document": _max(model.encode_document(texts=TEXTS), st.encode_document(TEXTS)),
        "prompt=": _max(model.encode(texts=TEXTS, prompt="Say it."), st.encode(TEXTS, prompt="Say it. ")),
    }
    # transformers: the ForCausalLM base model, unpadded rows, last token -> [Dense] -> normalize
    hf, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert type(hf).__name__ == "Qwen2Model" and not info["missing_keys"] and not info["unexpected_keys"]
    _, info = transformers.Qwen2ForCausalLM.from_pretrained(out, output_loading_info=True)
    assert set(info["missing_keys"]) <= {"lm_head.weight"} and not info["unexpected_keys"]
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (
        tok(TEXTS[0])["input_ids"][-1] == tok.eos_token_id and len(tok(TEXTS[-1], truncation=True)["input_ids"]) == 128
    )
    with torch.inference_mode():
        h = torch.stack(
            [hf.eval()(**tok([t], truncation=True, return_tensors="pt")).last_hidden_state[0, -1] for t in TEXTS]
        )
        if model.proj is not None:
            h = h @ model.proj.weight.T
    diffs["AutoModel"] = _max(model.encode(texts=TEXTS), torch.nn.functional.normalize(h, dim=-1))
    print("max abs diff (text-only):", diffs)
    assert max(diffs.values()) <= TOL, diffs


def test_text_only_settings_transformers_cannot_express_are_refused(tmp_path):
    torch.manual_seed(0)
    for over, msg in [
        ("model.backbone.attention=bidirectional", r"backbone.attention=bidirectional: Qwen2ForCausalLM runs causal"),
        ("model.pooler={type: mean}", r"pooler.type=mean: --to hf exports text-only models with last_token"),
    ]:
        src = mmembed.build_model(TINY_RECIPE, ["model.vision=null", "model.connector=null", over]).save(
            tmp_path / over.split("=")[0]
        )
        with pytest.raises(ExportError, match=msg):
            export_model(src, tmp_path / "hf", to="hf")
        assert (
            export_model(src, tmp_path / "st", to="sentence-transformers", overwrite=True) / "modules.json"
        ).is_file()


def test_vllm_check_without_vllm_exits_3(tmp_path):
    """This environment has no vLLM: the tool and the accelerator script say so with exit code 3."""
    src = _text_model(tmp_path)
    out = export_model(src, tmp_path / "hf", to="hf")
    tool = _tool()
    info = tool.read_export(out)
    assert not info["vlm"] and info["normalize"] and info["pooling"] == "lasttoken"
    assert [r["name"] for r in tool.rows(info)][-2:] == ["query text", "document text"]
    assert tool.vllm_prompts(out, info, tool.rows(info))[-1] == "A document. a red circle on the left"
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    proc = subprocess.run([sys.executable, "tools/vllm_check.py", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 3 and "`import vllm` failed" in proc.stderr, proc.stderr
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "tools/gpu/vllm_check.sh"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 3 and "vLLM is not installed" in proc.stderr, proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["model.embed_dim=32"]], ids=["plain", "dense"])
def test_vllm_pooling_runner_embeds_as_mmembed(extra, tmp_path):
    python = os.environ.get("MMEMBED_VLLM_PYTHON")
    if not python:
        pytest.skip("set MMEMBED_VLLM_PYTHON to a Python with vLLM (docs/export.md, 'vLLM', has the commands)")
    src = _text_model(tmp_path, *extra)
    out = export_model(src, tmp_path / "hf", to="hf")
    figures = tmp_path / "vllm.json"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    cmd = [python, "tools/vllm_check.py", str(out), "--model-dir", str(src), "--json", str(figures)]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1"}, timeout=900
    )
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(figures.read_text())
    assert data["ok"] and data["max_abs_diff"] <= VLLM_TOL and all(r["ids_equal"] for r in data["rows"])
    # vLLM's vectors against mmembed's encode in this environment (the tool's reference there is transformers)
    tool, model = _tool(), mmembed.load(src)
    diffs = {}
    for row in data["rows"]:
        images = [tool.make_image(row["image"])] if row["image"] is not None else None
        want = model.encode(texts=[row["text"]], images=images, prompt_name=row["prompt"])[0]
        diffs[row["name"]] = _max(want, row["vllm"])
    print(f"vLLM {data['vllm']} vs mmembed encode, max abs diff:", diffs)
    assert max(diffs.values()) <= VLLM_TOL, diffs
