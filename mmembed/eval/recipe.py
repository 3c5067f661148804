"""What model was scored: the essentials of a model directory, and the training recipe when it is known.

A model directory saved by training sits in ``RUN/final`` (or ``RUN/best``) with the run's resolved recipe
``RUN/config.yaml`` beside it; ``mmembed_config.json`` inside it names the components (backbone, vision tower,
connector, pooler). ``scores.json`` gets all of it (``model_info``); ``scores.md`` shows the essentials.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmembed.eval.openclip import PREFIX

__all__ = ["describe_model", "model_markdown", "RECIPE_KEYS"]

#: recipe fields ``scores.md`` shows (dotted paths into ``config.yaml``), when present
RECIPE_KEYS = (
    "data.train",
    "data.eval",
    "loss.type",
    "loss.temperature",
    "train.max_steps",
    "train.batch_size",
    "train.optimizer",
    "train.lr",
    "train.schedule",
    "train.precision",
    "train.zero_stage",
    "train.gradcache_chunk_size",
    "train.seed",
)


def _get(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _component(c: Any) -> str | None:
    """``{"type": "timm", "name": "test_vit"}`` -> ``timm test_vit``; None for an absent component."""
    if not isinstance(c, dict) or not c:
        return None
    bits = [str(c.get("type") or "")]
    for k in ("name", "depth", "layers"):
        if c.get(k) not in (None, ""):
            bits.append(f"{k}={c[k]}" if k != "name" else str(c[k]))
    return " ".join(b for b in bits if b) or None


def _recipe(run: Path) -> dict[str, Any] | None:
    """The recipe of training run ``run``: its ``config.yaml``, when the folder looks like a run (not any parent)."""
    path = run / "config.yaml"
    if not path.is_file() or not any((run / f).exists() for f in ("versions.json", "metrics.jsonl", "checkpoints")):
        return None
    try:
        import yaml

        config = yaml.safe_load(path.read_text())
    except Exception as e:  # noqa: BLE001 - an unreadable recipe is reported, never fatal to the eval
        return {"path": str(path), "error": f"{type(e).__name__}: {e}"}
    if not isinstance(config, dict) or not isinstance(config.get("train"), dict):
        return None  # some other config.yaml
    essentials = {k: v for k in RECIPE_KEYS if (v := _get(config, k)) is not None}
    return {"path": str(path), "essentials": essentials, "config": config}


def describe_model(spec: str) -> dict[str, Any] | None:
    """``model_info`` of ``scores.json``: what ``spec`` (a model dir or ``openclip:...``) is; None when unknown."""
    if spec.startswith(PREFIX):
        body = spec[len(PREFIX) :]
        arch, _, pretrained = body.partition(":")
        return {"kind": "openclip", "arch": arch, "pretrained": pretrained or None, "random_weights": not pretrained}
    d = Path(spec)
    cfg_path = d / "mmembed_config.json"
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return {"kind": "mmembed", "dir": str(d), "error": f"{cfg_path}: not readable JSON"}
    m = cfg.get("model", {}) if isinstance(cfg.get("model"), dict) else {}
    info: dict[str, Any] = {
        "kind": "mmembed",
        "dir": str(d),
        "backbone": _component(m.get("backbone")),
        "vision": _component(m.get("vision")),
        "connector": _component(m.get("connector")),
        "pooler": _component(m.get("pooler")),
        "fusion": _component(m.get("fusion")),
        "embed_dim": cfg.get("embed_dim", m.get("embed_dim")),
        "image_tokens": cfg.get("image_tokens"),
        "created": cfg.get("created"),
    }
    info = {k: v for k, v in info.items() if v is not None}
    recipe = _recipe(d.resolve().parent)
    if recipe is not None:
        info["recipe"] = recipe
    return info


def model_markdown(info: dict[str, Any] | None) -> list[str]:
    """The ``## Model`` section of ``scores.md`` (empty when nothing is known)."""
    if not info:
        return []
    lines = ["## Model", ""]
    if info["kind"] == "openclip":
        weights = info["pretrained"] or "**RANDOM weights** (no pretrained tag)"
        return [*lines, f"open_clip `{info['arch']}`, pretrained: {weights}", ""]
    if info.get("error"):
        return [*lines, info["error"], ""]
    keys = ("backbone", "vision", "connector", "pooler", "fusion", "embed_dim", "image_tokens")
    lines += ["| " + " | ".join(k for k in keys if k in info) + " |", "|" + "---|" * sum(k in info for k in keys)]
    lines += ["| " + " | ".join(f"`{info[k]}`" for k in keys if k in info) + " |", ""]
    recipe = info.get("recipe")
    if not recipe:
        return [*lines, "Training recipe: unknown (no `config.yaml` beside the model directory).", ""]
    lines.append(f"Training recipe: `{recipe['path']}`")
    if recipe.get("error"):
        return [*lines, f"(not readable: {recipe['error']})", ""]
    lines.append("")
    lines += [f"- {k}: `{v}`" for k, v in recipe["essentials"].items()]
    return [*lines, ""]
