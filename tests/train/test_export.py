"""tools/export_checkpoint.py: any DeepSpeed checkpoint (ZeRO 0 and 3, with LoRA) -> the same model directory."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from safetensors.torch import load_file

import mmembed
from tests.conftest import make_image
from tests.train.conftest import ROOT, run_train, train_overrides

pytestmark = pytest.mark.usefixtures("torch_extensions_dir")


def _export_tool():
    spec = importlib.util.spec_from_file_location("export_checkpoint", ROOT / "tools" / "export_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    "extra",
    [{"train.zero_stage": 0}, {"train.zero_stage": 3}, {"train.zero_stage": 0, "train.lora": "{r: 4, alpha: 8}"}],
    ids=["zero0", "zero3", "zero0-lora"],
)
def test_exported_checkpoint_equals_the_final_model(extra, demo_data, tmp_path):
    out = tmp_path / "run"
    proc = run_train(train_overrides(demo_data, out, **{"train.max_steps": 2, "train.save_every": 2, **extra}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = _export_tool().export(out / "checkpoints" / "step_2", tmp_path / "exported")
    a = load_file(out / "final" / "model.safetensors")
    b = load_file(exported / "model.safetensors")
    assert a.keys() == b.keys()
    assert not any("lora" in k for k in b), "LoRA adapters must be merged on export"
    for k in a:
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), atol=1e-6, err_msg=k)
    texts, images = ["a red circle", None], [None, make_image(3)]
    e1 = mmembed.load(out / "final").encode(texts=texts, images=images)
    e2 = mmembed.load(exported).encode(texts=texts, images=images)
    np.testing.assert_allclose(e1, e2, atol=1e-6)


def test_export_refuses_incomplete_checkpoints(tmp_path):
    (tmp_path / "step_3").mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        _export_tool().export(tmp_path / "step_3", tmp_path / "out")
