"""Turn a published VLM2Vec / GME-style checkpoint (HF format, optionally + a peft LoRA adapter) into an mmembed model.

    python tools/import_checkpoint.py SRC OUT [--adapter DIR] [--base DIR_OR_HUB_ID] [--pooling last_token]

Layouts understood:
- SRC is a full HF model directory (``config.json`` + weights + processor files; GME, merged VLM2Vec releases).
- SRC is a peft adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``, the VLM2Vec LoRA
  releases): the base model is the adapter's ``base_model_name_or_path`` unless ``--base`` is given.
- ``--adapter DIR`` names the adapter explicitly, SRC being the base.

The ``ForConditionalGeneration`` model is loaded with its weights, the adapter is applied with peft and merged
(``merge_and_unload``, as VLM2Vec does for evaluation, docs/mmeb.md §1.8), the LM head is dropped, and the base model
(``.model``) becomes the mmembed backbone (``qwen2_vl`` or ``llava``, picked from ``config.model_type``) with
last-token pooling and normalization (VLM2Vec's defaults), and VLM2Vec's own sequence layout and image processor
(``model.layout: vlm2vec``, ``image_backend: pil``; docs/mmeb.md, "VLM2Vec's layout"), so the imported model gives
the embeddings VLM2Vec's code gives (tests/test_vlm2vec_parity.py). ``--layout mmembed`` keeps mmembed's own.
The output loads offline with ``mmembed.load``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

_FAMILIES = {
    "qwen2_vl": ("qwen2_vl", "Qwen2VLForConditionalGeneration", "left"),
    "qwen2_5_vl": ("qwen2_vl", "Qwen2_5_VLForConditionalGeneration", "left"),
    "llava": ("llava", "LlavaForConditionalGeneration", "right"),
    "llava_next": ("llava", "LlavaNextForConditionalGeneration", "right"),
}
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json")


def _resolve(src: Path, adapter: str | None, base: str | None) -> tuple[str, str | None, str]:
    """(base model, adapter directory or None, processor source)."""
    if adapter is None and (src / "adapter_config.json").is_file():
        adapter = str(src)
        if base is None:
            base = json.loads((src / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not base:
                raise ValueError(f"{src}/adapter_config.json has no base_model_name_or_path; pass --base")
    base = base or str(src)
    has_proc = any((src / f).is_file() for f in _PROCESSOR_FILES)
    return base, adapter, str(src) if has_proc else base


def import_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    adapter: str | None = None,
    base: str | None = None,
    pooling: str = "last_token",
    normalize: bool = True,
    padding_side: str | None = None,
    dtype: str = "float32",
    layout: str = "vlm2vec",
    image_backend: str | None = "pil",
) -> Path:
    """Convert ``src`` (see the module docstring) into the mmembed model directory ``out``; return ``out``."""
    import transformers
    from transformers import AutoConfig

    import mmembed
    from mmembed.backbones.native import DTYPES

    base_name, adapter_dir, proc_src = _resolve(Path(src), adapter, base)
    model_type = AutoConfig.from_pretrained(base_name).model_type
    if model_type not in _FAMILIES:
        raise ValueError(f"{base_name}: model_type {model_type!r} is not one of {', '.join(_FAMILIES)}")
    family, cls_name, side = _FAMILIES[model_type]
    full: Any = getattr(transformers, cls_name).from_pretrained(base_name, dtype=DTYPES[dtype])
    if adapter_dir is not None:
        from peft import PeftModel

        full = PeftModel.from_pretrained(full, adapter_dir).merge_and_unload()
    backbone = {"type": family, "name": base_name, "processor": proc_src, "pretrained": False, "dtype": dtype}
    if image_backend:
        backbone["image_backend"] = image_backend
    recipe = {
        "model": {
            "backbone": backbone,
            "layout": layout,
            "pooler": {"type": pooling},
            "normalize": normalize,
            "padding_side": padding_side or side,
        }
    }
    model = mmembed.build_model(recipe)
    model.backbone.model.load_state_dict(full.model.state_dict(), strict=True)
    return model.eval().save(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="HF model directory or peft adapter directory (or hub id)")
    ap.add_argument("out", help="mmembed model directory to write")
    ap.add_argument("--adapter", help="peft LoRA adapter directory (SRC is then the base)")
    ap.add_argument("--base", help="base model (overrides the adapter's base_model_name_or_path)")
    ap.add_argument("--pooling", default="last_token")
    ap.add_argument("--no-normalize", action="store_true")
    ap.add_argument("--padding-side", choices=["left", "right"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--layout", default="vlm2vec", choices=["vlm2vec", "mmembed"], help="sequence layout (VLM2Vec's)")
    ap.add_argument("--image-backend", default="pil", choices=["pil", "torchvision"], help="image processor backend")
    args = ap.parse_args(argv)
    with torch.no_grad():
        path = import_checkpoint(
            args.src,
            args.out,
            adapter=args.adapter,
            base=args.base,
            pooling=args.pooling,
            normalize=not args.no_normalize,
            padding_side=args.padding_side,
            dtype=args.dtype,
            layout=args.layout,
            image_backend=args.image_backend,
        )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
