"""The tiny native-VLM recipes train under ``python -m mmembed.train`` (DeepSpeed engine, 1 CPU process, LoRA/DoRA
merged on export) and their exported model reloads; GradCache over native batches is exact on tiny Qwen2-VL."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import mmembed
from tests.conftest import make_image
from tests.native_vlms import ROOT, run_recipe
from tests.train.conftest import train_overrides

pytestmark = pytest.mark.usefixtures("torch_extensions_dir")


@pytest.mark.parametrize("recipe", ["recipes/tiny/qwen2vl.yaml", "recipes/tiny/llava.yaml"])
def test_tiny_recipe_trains_and_its_export_reloads(recipe, demo_data, tmp_path):
    out = tmp_path / "run"
    extra = {"train.max_steps": 3, "train.gradcache_chunk_size": 2}
    proc = run_recipe(recipe, train_overrides(demo_data, out, **extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and np.isfinite(losses).all()
    trained = load_file(out / "final" / "model.safetensors")
    assert not any("lora" in k for k in trained), "LoRA adapters must be merged on export"
    start = mmembed.build_model(ROOT / recipe, ["model.max_length=48"]).state_dict()
    assert trained.keys() == start.keys()
    moved = [k for k in start if not torch.equal(start[k], trained[k])]
    assert any("language_model" in k for k in moved), "the LLM weights must change (LoRA merged)"
    model = mmembed.load(out / "final")
    texts, images = ["a red circle", None, "<image> what color?"], [None, make_image(1), [make_image(2)]]
    emb = model.encode(texts=texts, images=images, instruction="Represent the given input.")
    assert emb.shape == (3, 64) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    again = mmembed.load(model.save(tmp_path / "again")).encode(
        texts=texts, images=images, instruction="Represent the given input."
    )
    np.testing.assert_array_equal(emb, again)


@pytest.mark.parametrize(
    "extra",
    [
        # the stock path shares its code with the connector+aim case; the full sweep: make test-all
        pytest.param([], marks=pytest.mark.slow),
        [
            "model.connector={type: pool_adapter, pool_size: 2, mode: adaptive}",
            "model.merge={type: aim, keep_ratio: 0.5}",
            "model.prune={type: aim}",
        ],
    ],
    ids=["stock", "connector+aim"],
)
def test_gradcache_over_native_qwen2vl_batches_equals_the_plain_step(extra, demo_data, tmp_path):
    """Also with a connector in place of the merger and AIM merging + pruning (sequences rebuilt by mmembed)."""
    common = {"train.max_steps": 1, "train.optimizer": "sgd", "train.lr": 0.5, "train.grad_clip": 0.0}
    plain = run_recipe(
        "recipes/tiny/qwen2vl.yaml",
        train_overrides(demo_data, tmp_path / "plain", **common, **{"train.gradcache_chunk_size": 0}) + extra,
    )
    gc = run_recipe(
        "recipes/tiny/qwen2vl.yaml",
        train_overrides(demo_data, tmp_path / "gc", **common, **{"train.gradcache_chunk_size": 2}) + extra,
    )
    assert plain.returncode == 0 and gc.returncode == 0, (plain.stderr + gc.stderr)[-3000:]
    a = load_file(tmp_path / "plain" / "final" / "model.safetensors")
    b = load_file(tmp_path / "gc" / "final" / "model.safetensors")
    start = mmembed.build_model(ROOT / "recipes/tiny/qwen2vl.yaml", ["model.max_length=48", *extra]).state_dict()
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 1e-3, "the step must move the weights"
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5


def test_tiny_qwen2vl_with_a_connector_trains_it_beside_lora_and_reloads(demo_data, tmp_path):
    out = tmp_path / "run"
    over = ["model.connector={type: mlp}", "model.merge={type: aim, keep_ratio: 0.5}"]
    extra = {"train.max_steps": 2, "train.gradcache_chunk_size": 2}
    proc = run_recipe("recipes/tiny/qwen2vl.yaml", [*train_overrides(demo_data, out, **extra), *over])
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = load_file(out / "final" / "model.safetensors")
    torch.manual_seed(0)
    start = mmembed.build_model(ROOT / "recipes/tiny/qwen2vl.yaml", over).state_dict()
    assert trained.keys() == start.keys()
    frozen = [k for k in start if ".visual." in k]  # the Qwen2-VL ViT: no LoRA target, frozen
    assert frozen and all(torch.equal(start[k], trained[k]) for k in frozen), "same initialization"
    conn = [k for k in start if k.startswith("connector.")]
    assert conn and all(not torch.equal(start[k], trained[k]) for k in conn), "LoRA must not freeze the connector"
    model = mmembed.load(out / "final")
    assert model.connector is not None and model.visual.connector is model.connector
    emb = model.encode(texts=["<image> what color?", "a red circle"], images=[make_image(1), None])
    assert emb.shape == (2, 64) and np.isfinite(emb).all()
