"""Tiny HF VLM checkpoints saved offline in the hub layout (config + weights + processor), and a recipe runner.

The session fixture ``hf_checkpoint`` is registered in tests/conftest.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava", "llava_next")


def tiny_hf(family: str, seed: int = 0):
    """(HF ForConditionalGeneration in eval mode, its processor, mmembed backbone type) for ``family``."""
    import transformers

    from mmembed.backbones.llava import TINY_LLAVA_CONFIG, TINY_LLAVA_NEXT_CONFIG, build_tiny_llava_processor
    from mmembed.backbones.qwen2_vl import TINY_QWEN2VL_CONFIG, TINY_QWEN25VL_CONFIG, build_tiny_qwen2vl_processor

    if family in EXTRA_FAMILIES:
        return EXTRA_FAMILIES[family](seed)
    cfg, cls_name = {
        "qwen2_vl": (TINY_QWEN2VL_CONFIG, "Qwen2VLForConditionalGeneration"),
        "qwen2_5_vl": (TINY_QWEN25VL_CONFIG, "Qwen2_5_VLForConditionalGeneration"),
        "llava": (TINY_LLAVA_CONFIG, "LlavaForConditionalGeneration"),
        "llava_next": (TINY_LLAVA_NEXT_CONFIG, "LlavaNextForConditionalGeneration"),
    }[family]
    cls = getattr(transformers, cls_name)
    args = {k: v for k, v in cfg.items() if k != "model_type"}
    torch.manual_seed(seed)
    model = cls._from_config(cls.config_class(**args), attn_implementation="sdpa").eval()
    if family.startswith("qwen"):
        proc = build_tiny_qwen2vl_processor()
        return model, proc, "qwen2_vl"
    pins = cfg.get("image_grid_pinpoints")
    return model, build_tiny_llava_processor(pinpoints=pins), "llava"


def tiny_qwen3vl(seed: int = 0):
    """A tiny random-init ``Qwen3VLForConditionalGeneration`` (``TINY_QWEN3VL_CONFIG``: hidden 64, 2 LLM layers,
    3-layer ViT with DeepStack mergers on ViT layers 0 and 1, interleaved M-RoPE sections [6, 5, 5] of head_dim 32)
    and its offline ``Qwen3VLProcessor`` (tiny tokenizer + the Qwen vision tokens 400-403, 16 px patches)."""
    import transformers

    from mmembed.backbones.qwen3_vl import TINY_QWEN3VL_CONFIG, build_tiny_qwen3vl_processor

    args = {k: v for k, v in TINY_QWEN3VL_CONFIG.items() if k != "model_type"}
    cls = transformers.Qwen3VLForConditionalGeneration
    torch.manual_seed(seed)
    model = cls._from_config(cls.config_class(**args), attn_implementation="sdpa").eval()
    return model, build_tiny_qwen3vl_processor(), "qwen3_vl"


def tiny_llava_onevision(seed: int = 0):
    """A tiny random-init ``LlavaOnevisionForConditionalGeneration`` (``TINY_LLAVA_ONEVISION_CONFIG``: SigLIP 32 px
    tiles of 16 tokens, any-res up to 2x2 tiles shrunk by ``anyres_max_1``, ``image_newline``, 2-layer Qwen2) and its
    offline ``LlavaOnevisionProcessor``."""
    import transformers

    from mmembed.backbones.llava_onevision import TINY_LLAVA_ONEVISION_CONFIG, build_tiny_llava_onevision_processor

    args = {k: v for k, v in TINY_LLAVA_ONEVISION_CONFIG.items() if k != "model_type"}
    cls = transformers.LlavaOnevisionForConditionalGeneration
    torch.manual_seed(seed)
    model = cls._from_config(cls.config_class(**args), attn_implementation="sdpa").eval()
    proc = build_tiny_llava_onevision_processor(pinpoints=args["image_grid_pinpoints"])
    return model, proc, "llava_onevision"


#: families outside ``FAMILIES`` (their own tests): family -> builder(seed) -> (HF model, processor, backbone type)
EXTRA_FAMILIES = {"qwen3_vl": tiny_qwen3vl, "llava_onevision": tiny_llava_onevision}


def hf_checkpoint_factory(tmp_path_factory):
    """family -> (directory holding a tiny HF checkpoint + processor, the HF model, the processor)."""
    cache: dict[str, tuple[Path, object, object]] = {}

    def get(family: str):
        if family not in cache:
            model, proc, _ = tiny_hf(family)
            path = tmp_path_factory.mktemp(family)
            model.save_pretrained(path)
            proc.save_pretrained(path)
            cache[family] = (path, model, proc)
        return cache[family]

    return get


def run_recipe(recipe: str, overrides: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m mmembed.train RECIPE overrides`` in a subprocess (offline)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "mmembed.train", str(ROOT / recipe), *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


#: image sizes of :func:`mixed_rows` (different aspect ratios, so dynamic-resolution grids differ per image)
SIZES = [(40, 48), (100, 70), (64, 64), (90, 120), (56, 56)]


def mixed_rows():
    """(six sides: text only, short text, image + instruction, image only, image + text, two interleaved images;
    the five images they use)."""
    from mmembed.data.sample import Side
    from tests.conftest import make_image

    imgs = [make_image(i, size=s) for i, s in enumerate(SIZES)]
    sides = [
        Side(instruction="Represent the given text.", text="a red circle on the left", images=[]),  # text only
        Side(text="blue", images=[]),  # text only, short (padding)
        Side(instruction="Represent the given image.", text=None, images=[imgs[0]]),  # image + instruction
        Side(text=None, images=[imgs[1]]),  # image only
        Side(instruction="Find an image caption", text="<image> what color is the object?", images=[imgs[2]]),
        Side(text="two <image> and <image> compare", images=[imgs[3], imgs[4]]),  # interleaved, two images
    ]
    return sides, imgs


def expected_texts(image_text: str) -> list[str]:
    """The HF processor's text for each row of :func:`mixed_rows`, written out by hand (VLM2Vec layout + EOS)."""
    return [
        "Represent the given text. a red circle on the left</s>",
        "blue</s>",
        f"{image_text}Represent the given image.</s>",
        f"{image_text}</s>",
        f"{image_text}Find an image caption what color is the object?</s>",
        f"two {image_text} and {image_text} compare</s>",
    ]


def gradcache_and_plain(model, qb, tb, chunk_size: int = 2, temperature: float = 0.05):
    """One GradCache step of ``model`` and one plain step of a deep copy on the same batches.

    Returns (GradCache step result, the plain loss, ``{name: grad}`` of the GradCache model, of the plain copy)."""
    import copy

    from mmembed.losses import InfoNCELoss
    from mmembed.train import gradcache as gc

    ref = copy.deepcopy(model)
    loss = InfoNCELoss(temperature=temperature)
    res = gc.gradcache_step(model, qb, tb, loss, chunk_size=chunk_size, split_fn=model.processor.split)
    plain = loss(ref(qb), ref(tb))
    plain.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    return res, plain, grads, ref_grads
