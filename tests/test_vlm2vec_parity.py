"""``model.layout: vlm2vec`` gives VLM2Vec's own token ids, positions and embeddings.

The fixtures (tests/fixtures/vlm2vec_parity/{qwen2vl,llava_next}) were written by ``tools/parity/vlm2vec.py
--write-fixtures``: a tiny random Qwen2-VL and LLaVA-Next saved by VLM2Vec's bundled classes (vlm2vec-for-pyserini
0.2.0, transformers 4.51.3) with their processors, and what VLM2Vec's ``MMEBModel.encode_input`` gave on five rows.
The tool itself (which builds the peer's venv) runs in the slow test at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmembed.build import build_model
from mmembed.losses import InfoNCELoss
from mmembed.types import ConfigError, Side

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "vlm2vec_parity"
FAMILIES = ["qwen2vl", "llava_next"]


def _real(a: np.ndarray, mask: np.ndarray) -> list[list[int]]:
    return [row[m.astype(bool)].tolist() for row, m in zip(a, mask)]


def _embed(family: str, layout: str, backend: str | None, *extra: str) -> dict[str, np.ndarray]:
    FIX = FIXTURES / family
    meta = json.loads((FIX / "rows.json").read_text())
    over = [f"model.backbone.name={FIX / 'checkpoint'}", "model.backbone.config=null", f"model.layout={layout}"]
    over += [f"model.backbone.image_backend={backend}"] if backend else []
    model = build_model(str(REPO / meta["recipe"]), over + list(extra)).eval()
    rows = meta["rows"]
    sides = [
        Side(text=r["text"], images=[str(FIX / r["image"])] if r["image"] else [], instruction=r["instruction"])
        for r in rows
    ]
    seen: list[torch.Tensor] = []
    model.backbone.language_model().register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw.get("position_ids")), with_kwargs=True
    )
    with torch.no_grad():
        batch = model.processor(sides)
        emb = model(batch)
    # the pruned forward runs the layers one by one, not the language model's forward: no positions seen then
    pos = seen[-1] if seen else None
    if seen and pos is None:  # the LLM numbers positions itself (LLaVA): 0..L-1 over the padded row
        pos = torch.arange(batch["attention_mask"].shape[1]).expand(batch["attention_mask"].shape[0], -1)
    if pos is not None and pos.ndim == 2:
        pos = pos.unsqueeze(0).expand(3, -1, -1)
    loss = InfoNCELoss(temperature=meta["temperature"], mask_same_targets=False, gather=False)(
        emb[meta["queries"]], emb[meta["targets"]]
    )
    return {
        "ids": batch["input_ids"].numpy(),
        "mask": batch["attention_mask"].numpy(),
        "pos": None if pos is None else pos.numpy(),
        "emb": emb.numpy(),
        "loss": float(loss),
    }


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def peer(family) -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / family / "vlm2vec.npz"))


@pytest.fixture(scope="module")
def ours(family) -> dict[str, np.ndarray]:
    return _embed(family, "vlm2vec", "pil")


def test_token_ids_are_vlm2vecs(peer, ours):
    assert _real(ours["ids"], ours["mask"]) == _real(peer["input_ids"], peer["attention_mask"])


def test_every_token_is_numbered_as_vlm2vec_does(peer, ours):
    """1-D positions (on all three M-RoPE axes for Qwen), image tokens included (Qwen: no vision-start marker)."""
    for axis in range(3):
        mine = _real(ours["pos"][axis], ours["mask"])
        theirs = _real(peer["positions_first"][axis], peer["attention_mask"])
        assert [[p - r[0] for p in r] for r in mine] == [[p - r[0] for p in r] for r in theirs]
        assert all(r == list(range(len(r))) for r in mine)


def test_embeddings_and_loss_equal_vlm2vecs(peer, ours):
    assert np.abs(ours["emb"] - peer["emb_first"]).max() <= 1e-5
    assert abs(ours["loss"] - float(peer["loss"])) <= 1e-5


def test_the_loss_gradient_is_vlm2vecs(family, peer):
    """InfoNCE (tau 0.02) on the five rows, backward: the last decoder layer's o_proj gradient equals VLM2Vec's."""
    FIX = FIXTURES / family
    meta = json.loads((FIX / "rows.json").read_text())
    over = [
        f"model.backbone.name={FIX / 'checkpoint'}",
        "model.backbone.config=null",
        "model.layout=vlm2vec",
        "model.backbone.image_backend=pil",
    ]
    model = build_model(str(REPO / meta["recipe"]), over)
    rows = meta["rows"]
    sides = [
        Side(text=r["text"], images=[str(FIX / r["image"])] if r["image"] else [], instruction=r["instruction"])
        for r in rows
    ]
    emb = model(model.processor(sides))
    InfoNCELoss(temperature=meta["temperature"], mask_same_targets=False, gather=False)(
        emb[meta["queries"]], emb[meta["targets"]]
    ).backward()
    grad = model.backbone.language_model().layers[-1].self_attn.o_proj.weight.grad.numpy()
    ref = peer["grad_o_proj"]
    assert np.abs(ref).max() > 0 and np.abs(grad - ref).max() <= 1e-4 * np.abs(ref).max()


def test_each_half_of_the_layout_matters(family, peer):
    """mmembed's own layout gives other ids; VLM2Vec's layout with the torchvision image processor other pixels."""
    mine = _embed(family, "mmembed", None)
    assert _real(mine["ids"], mine["mask"]) != _real(peer["input_ids"], peer["attention_mask"])
    tv = _embed(family, "vlm2vec", "torchvision")
    assert _real(tv["ids"], tv["mask"]) == _real(peer["input_ids"], peer["attention_mask"])
    # resampling differs (1.3e-4 Qwen2-VL, 1.5e-5 LLaVA-Next measured), where pil matches to ~5e-8
    assert np.abs(tv["emb"] - peer["emb_first"]).max() > 1e-6


def test_the_spliced_path_numbers_tokens_the_same_way(family, ours):
    """With a keep-all pruner mmembed splices the visual rows itself; under vlm2vec it must still number them as
    text, giving the stock forward's embedding."""
    spliced = _embed(family, "vlm2vec", "pil", "model.prune={type: aim, schedule: [1.0, 1.0]}")
    assert np.abs(spliced["emb"] - ours["emb"]).max() <= 1e-5


def test_an_imported_vlm2vec_checkpoint_encodes_as_vlm2vec(family, peer, tmp_path):
    """tools/import_checkpoint.py on VLM2Vec's saved checkpoint, then the one-line API: VLM2Vec's embeddings."""
    import importlib.util

    import mmembed

    spec = importlib.util.spec_from_file_location("_import_checkpoint", REPO / "tools" / "import_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    FIX = FIXTURES / family
    assert tool.main([str(FIX / "checkpoint"), str(tmp_path / "mm")]) == 0
    model = mmembed.load(tmp_path / "mm")
    assert model.cfg.layout == "vlm2vec"
    rows = json.loads((FIX / "rows.json").read_text())["rows"]
    emb = model.encode(
        texts=[r["text"] for r in rows],
        images=[str(FIX / r["image"]) if r["image"] else None for r in rows],
        instruction=[r["instruction"] for r in rows],
        batch_size=2,  # other batches, other padding: the same vectors
    )
    assert np.abs(emb - peer["emb_first"]).max() <= 1e-5


def test_a_backbone_without_the_layout_is_refused_at_validation():
    with pytest.raises(ConfigError, match="model.layout"):
        build_model(str(REPO / "recipes" / "tiny" / "composed.yaml"), ["model.layout=vlm2vec"])


@pytest.mark.slow
def test_the_parity_tool_runs_against_vlm2vecs_own_code(tmp_path):
    """Builds the peer venv from the package registry (minutes) and compares live; exit 0 means exact."""
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "parity" / "vlm2vec.py"),
            "--venv",
            str(tmp_path / "venv"),
            "--work",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "PARITY OK" in out.stdout
