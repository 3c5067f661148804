"""Shared fixtures: tiny offline models built from recipes, generated images, no network."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "recipes" / "tiny" / "composed.yaml"


@pytest.fixture(scope="session")
def _tiny_model():
    import torch

    import mmembed

    torch.manual_seed(0)
    return mmembed.build_model(TINY_RECIPE).eval()


@pytest.fixture
def tiny_model(_tiny_model):
    """A fresh copy of the tiny composed model (timm test_vit + mlp + 2-layer Qwen2 + last_token)."""
    return copy.deepcopy(_tiny_model)


def make_image(seed: int, size: tuple[int, int] = (48, 40), mode: str = "RGB"):
    """A deterministic image with a colored rectangle on a noisy background."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    arr[size[1] // 4 : size[1] // 2, size[0] // 4 : size[0] // 2] = rng.integers(0, 255, size=3, dtype=np.uint8)
    img = Image.fromarray(arr, mode="RGB")
    return img if mode == "RGB" else img.convert(mode)


@pytest.fixture
def images():
    return [make_image(i, size=(40 + 8 * i, 64 - 4 * i)) for i in range(6)]


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """A small rendered-scenes set in MMEB format (train manifest + eval parquet files)."""
    from mmembed.data.synthetic import generate

    out = tmp_path_factory.mktemp("demo")
    generate(out, n_train=60, n_eval=12, seed=0, image_size=32)
    return out


@pytest.fixture(scope="session")
def torch_extensions_dir(tmp_path_factory) -> str:
    """One DeepSpeed op cache per test run (shared by all launches; never shared across torch versions)."""
    path = os.environ.get("TORCH_EXTENSIONS_DIR") or str(tmp_path_factory.mktemp("torch_ext"))
    os.environ["TORCH_EXTENSIONS_DIR"] = path
    return path


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """family -> (directory holding a tiny HF checkpoint + processor, the HF model, the processor)."""
    from tests.native_vlms import hf_checkpoint_factory

    return hf_checkpoint_factory(tmp_path_factory)
