"""What the three adapters share: the install hint when a framework is missing, the model argument, image
conversion, and that no adapter pulls in the training stack (deepspeed, torch.distributed)."""

from __future__ import annotations

import ast
import importlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmembed.adapters import _common
from tests.conftest import make_image

ADAPTERS = Path(_common.__file__).parent
CASES = [  # adapter module, a package it imports, the extra its error names
    ("mmembed.adapters.mteb", "mteb", "mteb"),
    ("mmembed.adapters.langchain", "langchain_core.embeddings", "langchain"),
    ("mmembed.adapters.llama_index", "llama_index.core.embeddings", "llamaindex"),
]


@pytest.mark.parametrize(("module", "package", "extra"), CASES)
def test_missing_framework_names_the_extra(monkeypatch, module: str, package: str, extra: str) -> None:
    monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setitem(sys.modules, package, None)  # "import package" now fails as if it were not installed
    with pytest.raises(ImportError, match=rf"pip install mmembed\[{extra}\]"):
        importlib.import_module(module)


def test_resolve_model(tiny_model, tmp_path) -> None:
    assert _common.resolve_model(tiny_model) is tiny_model
    loaded = _common.resolve_model(tiny_model.save(tmp_path / "m"), truncate_dim=8)
    assert loaded.truncate_dim == 8
    with pytest.raises(TypeError, match="load options"):
        _common.resolve_model(tiny_model, truncate_dim=8)
    with pytest.raises(TypeError, match="EmbeddingModel or a model directory"):
        _common.resolve_model(object())
    with pytest.raises(ValueError, match="role must be"):
        _common.encode_role(tiny_model, "passage", texts=["x"])


def test_to_image_ref_conversions(tmp_path) -> None:
    img = make_image(3, size=(24, 16))
    pixels = np.array(img)
    assert _common.to_image_ref(img) is img
    path = tmp_path / "a.png"
    img.save(path)
    assert _common.to_image_ref(str(path)) == str(path) and _common.to_image_ref(path) == path
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    assert _common.to_image_ref(buf) == buf.getvalue() == _common.to_image_ref(bytearray(buf.getvalue()))
    assert _common.to_image_ref({"bytes": buf.getvalue(), "path": None}) == buf.getvalue()
    assert _common.to_image_ref({"bytes": None, "path": str(path)}) == str(path)
    chw = torch.from_numpy(pixels.copy()).permute(2, 0, 1)
    for arr in (chw, pixels, chw.float() / 255.0):  # (C, H, W) uint8, (H, W, C) uint8, (C, H, W) floats in 0..1
        assert np.array_equal(np.array(_common.to_image_ref(arr)), pixels)
    assert _common.to_rows([None, img, [img, img], []]) == [None, img, [img, img], None]
    with pytest.raises(TypeError, match="cannot use"):
        _common.to_image_ref(3.5)


def test_adapters_name_no_training_stack() -> None:
    """No adapter module imports deepspeed, torch.distributed or mmembed's training code."""
    for path in ADAPTERS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert not name.startswith(("deepspeed", "torch.distributed", "mmembed.train")), (path.name, name)


@pytest.mark.slow  # a fresh interpreter importing mteb, LlamaIndex and LangChain: about 15 s on 2 cores
def test_adapters_never_load_deepspeed() -> None:
    """Importing all three adapters and encoding through each leaves deepspeed and mmembed's training code unloaded
    (what the frameworks themselves import included), in a fresh interpreter."""
    from tests.conftest import TINY_RECIPE

    code = (
        "import sys, torch, mmembed\n"
        "from mmembed.adapters.mteb import MMEmbedEncoder\n"
        "from mmembed.adapters.langchain import MMEmbedEmbeddings\n"
        "from mmembed.adapters.llama_index import MMEmbedMultiModalEmbedding\n"
        "torch.manual_seed(0); m = mmembed.build_model(sys.argv[1]).eval()\n"
        "MMEmbedEmbeddings(m).embed_query('a'); MMEmbedMultiModalEmbedding(m).get_query_embedding('a')\n"
        "MMEmbedEncoder(m).encode([{'text': ['a']}], task_metadata=None, hf_split='test', hf_subset='default')\n"
        "bad = [k for k in ('deepspeed', 'mmembed.train', 'webdataset') if k in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(TINY_RECIPE)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
