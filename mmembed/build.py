"""Build an :class:`~mmembed.model.EmbeddingModel` from a recipe, a config dict or a :class:`ModelCfg`."""

from __future__ import annotations

import inspect
import os
from typing import Any

from mmembed.config import ConfigError, ModelCfg, RecipeCfg, load_recipe, slot_args
from mmembed.model import EmbeddingModel
from mmembed.processing import Processor
from mmembed.registry import BACKBONES, CONNECTORS, FUSIONS, POOLERS, REDUCERS, VISION, Registry

__all__ = ["build_model", "instantiate"]


def instantiate(registry: Registry, spec: dict[str, Any], **injected: Any) -> Any:
    """Build the component ``spec['type']`` with its config args plus the injected ones it accepts."""
    cls = registry.get(spec["type"])
    params = inspect.signature(cls).parameters
    args = slot_args(spec)
    obj = cls(**{k: v for k, v in injected.items() if k in params}, **args)
    obj.init_args = dict(args)
    obj.registry_name = spec["type"]
    return obj


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
    if getattr(BACKBONES.get(cfg.backbone["type"]), "native", False):
        return _build_native(cfg)
    backbone = instantiate(BACKBONES, cfg.backbone)
    placeholder_id = backbone.add_placeholder(cfg.image_placeholder)
    d = backbone.hidden_size
    vision = connector = None
    image_tokens = 0
    if cfg.vision is not None:
        vision = instantiate(VISION, cfg.vision)
        if cfg.connector is None:
            raise ConfigError("model.connector", "a vision encoder needs a connector (e.g. {type: mlp})")
        connector = instantiate(CONNECTORS, cfg.connector, in_dim=vision.out_dim, out_dim=d)
        image_tokens = connector.num_tokens(vision.grid())
    reducer = None
    if cfg.reducer is not None:
        reducer = instantiate(REDUCERS, cfg.reducer, dim=d, num_layers=backbone.num_layers)
        if getattr(reducer, "pre_llm", False):
            if vision is None:
                raise ConfigError("model.reducer", "a token reducer needs a vision encoder (model.vision)")
            image_tokens = reducer.num_tokens(image_tokens)  # placeholder rows per image after merging
    pooler = instantiate(POOLERS, cfg.pooler, dim=d, num_layers=backbone.num_layers)
    fusion = None
    if cfg.fusion is not None:
        fusion = instantiate(FUSIONS, cfg.fusion, dim=d, vision_dim=vision.out_dim if vision else d)
        if getattr(fusion, "micl_token", None):  # NoteLLM-2 mICL compression token
            fusion.micl_token_id = backbone.add_placeholder(fusion.micl_token)
    processor = Processor(
        tokenizer=backbone.tokenizer,
        placeholder=cfg.image_placeholder,
        placeholder_id=placeholder_id,
        image_tokens=image_tokens,
        transform=vision.transform if vision is not None else None,
        max_length=cfg.max_length,
        padding_side=cfg.padding_side,
        add_eos=backbone.add_eos,
        max_pixels=cfg.max_pixels,
        max_images=cfg.max_images_per_input,
    )
    return EmbeddingModel(cfg, backbone, pooler, processor, vision, connector, reducer, fusion)


def _build_native(cfg: ModelCfg) -> EmbeddingModel:
    """A native VLM backbone (Qwen2-VL, LLaVA): its own vision tower and HF processor.

    ``model.connector`` replaces the built-in projector; ``model.reducer`` merges (pre-LLM) and/or prunes (in the
    LLM). Slots a native model cannot take are refused before the (possibly large) model is loaded."""
    cls = BACKBONES.get(cfg.backbone["type"])
    for slot in ("vision", "fusion"):
        if getattr(cfg, slot) is not None:
            raise ConfigError(
                f"model.{slot}",
                f"backbone '{cfg.backbone['type']}' has its own vision tower; model.{slot} is not supported with it "
                "(leave it out; model.connector replaces its projector)",
            )
    if cfg.reducer is not None:
        reducer_cls = REDUCERS.get(cfg.reducer["type"])
        for flag, support in (("pre_llm", "supports_merge"), ("in_llm", "supports_prune")):
            if getattr(reducer_cls, flag, False) and not getattr(cls, support, False):
                raise ConfigError(
                    "model.reducer", f"backbone '{cfg.backbone['type']}' does not support {flag} reducers"
                )
    backbone = instantiate(BACKBONES, cfg.backbone)
    d = backbone.hidden_size
    connector = None
    if cfg.connector is not None:
        connector = instantiate(CONNECTORS, cfg.connector, in_dim=backbone.connector_in_dim(), out_dim=d)
        connector.to(backbone.model_dtype())
        backbone.attach_connector(connector)
    pooler = instantiate(POOLERS, cfg.pooler, dim=d, num_layers=backbone.num_layers)
    reducer = None
    if cfg.reducer is not None:
        reducer = instantiate(REDUCERS, cfg.reducer, dim=d, num_layers=backbone.num_layers)
    return EmbeddingModel(cfg, backbone, pooler, backbone.make_processor(cfg), connector=connector, reducer=reducer)
