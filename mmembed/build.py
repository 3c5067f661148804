"""Build an :class:`~mmembed.model.EmbeddingModel` from a recipe or a config, or load a saved model directory.

One builder for every backbone: the backbone is built first (it knows its width, depth and tokenizer), then each
slot with the dimensions it needs injected, then the visual path the backbone gives for those slots and the
processor family it names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mmembed import io
from mmembed.config import ModelCfg, RecipeCfg, load_recipe, model_cfg_from_dict
from mmembed.model import EmbeddingModel
from mmembed.processing import make_processor
from mmembed.registry import BACKBONES, CONNECTORS, FUSIONS, MERGERS, POOLERS, PRUNERS, VISION, instantiate
from mmembed.types import ConfigError

__all__ = ["build_model", "build_from_cfg", "load", "instantiate"]


def build_model(
    recipe: str | os.PathLike | dict[str, Any] | RecipeCfg | ModelCfg, overrides: list[str] | None = None
) -> EmbeddingModel:
    """A fresh model from a recipe path, a recipe dict, a :class:`RecipeCfg` or a :class:`ModelCfg`.

    Args:
        recipe: where the ``model`` section comes from.
        overrides: ``key=value`` strings applied on top (``model.connector.depth=1``).

    Raises:
        ConfigError: the recipe is invalid (names the key and the file).
    """
    if isinstance(recipe, ModelCfg):
        if overrides:
            raise ConfigError("", "overrides need a recipe, not a ModelCfg")
        cfg = recipe
        cfg.validate()
    else:
        cfg = load_recipe(recipe, overrides).model
    return build_from_cfg(cfg)


def build_from_cfg(cfg: ModelCfg) -> EmbeddingModel:
    """The model of a validated :class:`ModelCfg` (random init where no weights are named)."""
    backbone = instantiate(BACKBONES, cfg.backbone)
    d, depth = backbone.hidden_size, backbone.num_layers
    vision = instantiate(VISION, cfg.vision) if cfg.vision is not None else None
    connector = None
    if cfg.connector is not None:
        in_dim = vision.out_dim if vision is not None else backbone.connector_in_dim()
        connector = instantiate(CONNECTORS, cfg.connector, in_dim=in_dim, out_dim=d)
    merger = instantiate(MERGERS, cfg.merge) if cfg.merge is not None else None
    pruner = instantiate(PRUNERS, cfg.prune, num_layers=depth) if cfg.prune is not None else None
    pooler = instantiate(POOLERS, cfg.pooler, dim=d, num_layers=depth)
    visual = backbone.visual_path(vision, connector, merger, pruner)
    processor = make_processor(backbone, visual, cfg)
    fusion = None
    if cfg.fusion is not None:
        fusion = instantiate(FUSIONS, cfg.fusion, dim=d, vision_dim=vision.out_dim if vision is not None else d)
        if getattr(fusion, "micl_token", None):  # NoteLLM-2 mICL compression token
            fusion.micl_token_id = backbone.add_placeholder(fusion.micl_token)
    return EmbeddingModel(
        cfg,
        backbone,
        pooler,
        processor,
        visual,
        vision=vision,
        connector=connector,
        merge=merger,
        prune=pruner,
        fusion=fusion,
    )


def load(
    directory: str | os.PathLike,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
) -> EmbeddingModel:
    """Load a saved model directory with no network access; weights are loaded strictly.

    Safe by default: the directory cannot run code of its own (a saved ``trust_remote_code: true`` is refused
    unless the caller passes ``trust_remote_code=True``), every path it names must stay inside it, nothing is
    fetched from the hub (hub ids and ``pretrained: true`` are refused, ``HF_HUB_OFFLINE`` is forced while
    building), and weights come from ``model.safetensors`` only. Older formats are upgraded on the fly.

    Args:
        directory: a folder written by :func:`mmembed.io.save_model`.
        device: move the model there after loading.
        trust_remote_code: let transformers run Python code shipped with the directory's HF config.

    Raises:
        FileNotFoundError: not a model directory.
        ModelDirError: a config that is not JSON, an unknown ``format_version``, a path that leaves the
            directory, a hub id, or a remote-code request without the caller's opt-in (names file and key).
    """
    from safetensors.torch import load_model as st_load

    directory = Path(directory)
    cfg_path, model_dict, weights = io.resolve_model_dir(directory, trust_remote_code)
    cfg = model_cfg_from_dict(model_dict, source=str(cfg_path))
    with io.offline():
        model = build_from_cfg(cfg)
    st_load(model, str(weights), strict=True)
    model.eval()
    if device is not None:
        model.to(device)
    return model
