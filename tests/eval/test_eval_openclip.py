"""open_clip baselines behind mmembed's encode interface, scored through ``mmembed eval``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmembed.cli import main
from mmembed.eval import OpenClipEncoder, load_openclip
from tests.conftest import make_image

TINY = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_clip_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("oc") / "tiny-clip-test.json"
    path.write_text(json.dumps(TINY))
    return path


def test_rows_go_to_the_right_tower(tiny_clip_json: Path) -> None:
    enc = load_openclip(f"openclip:{tiny_clip_json}")
    assert isinstance(enc, OpenClipEncoder) and enc.embed_dim == 64 and enc.processor.placeholder == ""
    img = make_image(3)
    out = enc.encode(
        texts=[None, "a red square", "a red square"], images=[img, None, img], instruction=[None, "Find:", None]
    )
    assert out.shape == (3, 64) and np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    m = enc.model
    with torch.no_grad():
        i = F.normalize(m.encode_image(enc.preprocess(img)[None]), dim=-1)[0]
        t_inst = F.normalize(m.encode_text(enc.tokenizer(["Find: a red square"])), dim=-1)[0]
        t = F.normalize(m.encode_text(enc.tokenizer(["a red square"])), dim=-1)[0]
    np.testing.assert_allclose(out[0], i.numpy(), atol=1e-5)
    np.testing.assert_allclose(out[1], t_inst.numpy(), atol=1e-5)  # instruction prepended to the text
    np.testing.assert_allclose(out[2], F.normalize(i + t, dim=-1).numpy(), atol=1e-5)  # UniIR score fusion
    # the same weights again (seeded random init) -> the same fingerprint, so the cache key is stable
    assert load_openclip(f"openclip:{tiny_clip_json}").fingerprint == enc.fingerprint


def test_openclip_through_mmembed_eval(eval_setup: tuple[Path, Path], tiny_clip_json: Path, tmp_path: Path) -> None:
    _, data = eval_setup
    out = tmp_path / "oc"
    assert main(["eval", f"openclip:{tiny_clip_json}", "--data", str(data), "--out", str(out)]) == 0
    s = json.loads((out / "scores.json").read_text())
    assert s["model"] == f"openclip:{tiny_clip_json}" and set(s["datasets"]) == {"N24News", "MSCOCO_t2i"}
    assert s["datasets"]["MSCOCO_t2i"]["missing_images"] == 3 and 0.0 <= s["overall"] <= 1.0
    assert main(["eval", "openclip:No-Such-Arch", "--data", str(data), "--out", str(out)]) == 2


def test_local_weights_file_is_loaded(tiny_clip_json: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    src = load_openclip(f"openclip:{tiny_clip_json}")
    with torch.no_grad():
        for p in src.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(weights))
    enc = load_openclip(f"openclip:{tiny_clip_json}:{weights}")
    assert enc.fingerprint != load_openclip(f"openclip:{tiny_clip_json}").fingerprint
    np.testing.assert_allclose(enc.encode(texts=["a dog"]), src.encode(texts=["a dog"]), atol=1e-6)
