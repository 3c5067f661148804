"""The self-describing model directory (ARCHITECTURE.md §6) and loading it offline.

```
mmembed_config.json   format_version, model config (every slot), preprocess, prompts, similarity, versions
model.safetensors     full state dict, keys prefixed by slot (vision., connector., backbone., pooler., ...)
backbone/             the HF config, so the backbone rebuilds with no hub access
tokenizer/            the tokenizer with the image placeholder token
processor/            native VLM backbones (Qwen2-VL, LLaVA): the HF processor (tokenizer + image processor)
README.md             generated model card
```
Weights are safetensors only; nothing is ever unpickled. The directory is written under a temporary
name and renamed when complete.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_model", "load", "FORMAT_VERSION", "CONFIG_NAME", "WEIGHTS_NAME", "library_versions"]

FORMAT_VERSION = 1
CONFIG_NAME = "mmembed_config.json"
WEIGHTS_NAME = "model.safetensors"
_SLOTS = ("vision", "connector", "reducer", "pooler", "fusion")
_LOCAL_KEYS = ("name", "tokenizer", "processor")  # backbone args that point into the model directory once saved


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("mmembed", "torch", "transformers", "timm", "open_clip_torch", "safetensors", "tokenizers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _export_cfg(model: Any, directory: Path) -> dict[str, Any]:
    cfg = dataclasses.asdict(model.cfg)
    for slot in _SLOTS:
        module = getattr(model, slot)
        if module is not None:
            export = getattr(module, "export_args", None)
            args = export() if export else dict(getattr(module, "init_args", {}))
            cfg[slot] = {"type": module.registry_name, **args}
    cfg["backbone"] = {"type": model.backbone.registry_name, **model.backbone.export(directory)}
    return cfg


def save_model(model: Any, directory: str | os.PathLike, card: str | None = None) -> Path:
    """Write ``model`` to ``directory`` atomically (temporary folder, then rename)."""
    from safetensors.torch import save_model as st_save

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        model_cfg = _export_cfg(model, tmp)
        transform = model.processor.transform
        meta = {
            "format_version": FORMAT_VERSION,
            "model": model_cfg,
            "preprocess": transform.to_dict() if transform is not None else None,
            "image_tokens": model.processor.image_tokens,
            "embed_dim": model.embed_dim,
            "prompts": dict(model.cfg.prompts),
            "similarity": "cosine" if model.cfg.normalize else "dot",
            "versions": library_versions(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
        st_save(model, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "mmembed_format_version": "1"})
        (tmp / "README.md").write_text(card or _model_card(meta))
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            directory.rename(old)
        tmp.rename(directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load(directory: str | os.PathLike, device: str | torch.device | None = None) -> Any:
    """Load a saved model directory with no network access; weights are loaded strictly.

    Raises:
        FileNotFoundError: not a model directory.
        ValueError: a newer ``format_version`` than this mmembed understands.
    """
    from safetensors.torch import load_model as st_load

    from mmembed.build import build_from_cfg
    from mmembed.config import model_cfg_from_dict

    directory = Path(directory)
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{directory}: not an mmembed model directory (no {CONFIG_NAME})")
    meta = json.loads(cfg_path.read_text())
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{cfg_path}: format_version {version!r} is not supported (this mmembed reads <= {FORMAT_VERSION})"
        )
    model_dict = dict(meta["model"])
    backbone = dict(model_dict["backbone"])
    for key in _LOCAL_KEYS:
        value = backbone.get(key)
        if isinstance(value, str) and (directory / value).exists():
            backbone[key] = str(directory / value)
    model_dict["backbone"] = backbone
    cfg = model_cfg_from_dict(model_dict, source=str(cfg_path))
    model = build_from_cfg(cfg)
    st_load(model, str(directory / WEIGHTS_NAME), strict=True)
    model.eval()
    if device is not None:
        model.to(device)
    return model


def _model_card(meta: dict[str, Any]) -> str:
    m = meta["model"]
    slots = "\n".join(
        f"| {s} | {(m.get(s) or {}).get('type', '-')} |" for s in ("vision",) + _SLOTS[1:] + ("backbone",)
    )
    return f"""# mmembed model

Load it with:

```python
import mmembed
model = mmembed.load("path/to/this/dir")
emb = model.encode(texts=["a red circle"], images=[None], instruction="Represent the given text.")
```

| slot | component |
|---|---|
{slots}

- embedding dimension: {meta["embed_dim"]}, similarity: {meta["similarity"]}
- visual tokens per image: {meta["image_tokens"]}
- format_version: {meta["format_version"]}, created {meta["created"]}
- versions: {", ".join(f"{k} {v}" for k, v in meta["versions"].items())}
"""
