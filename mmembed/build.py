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

from mmembed import api, io
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
    backbone.use_layout(cfg.layout)
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
    dtype: str | torch.dtype | None = None,
    *,
    truncate_dim: int | None = None,
    similarity_fn_name: str | None = None,
) -> EmbeddingModel:
    """Load a saved model directory with no network access; weights are loaded strictly.

    Safe by default: the directory cannot run code of its own (a saved ``trust_remote_code: true`` is refused
    unless the caller passes ``trust_remote_code=True``), every path it names must stay inside it, nothing is
    fetched from the hub (hub ids and ``pretrained: true`` are refused, ``HF_HUB_OFFLINE`` is forced while
    building), and weights come from ``model.safetensors`` only. Older formats are upgraded on the fly.

    Memory: the model is built with its parameters on the meta device (accelerate's ``init_empty_weights``; buffers
    such as rotary frequencies are computed as usual) and the safetensors tensors become the parameters
    (``load_state_dict(assign=True)``), read straight onto ``device``: about one copy of the weights at the peak,
    no random initialization, the same values bit for bit.

    Args:
        directory: a folder written by :func:`mmembed.io.save_model`.
        device: where the weights go (``cpu`` by default, ``cuda``...).
        trust_remote_code: let transformers run Python code shipped with the directory's HF config.
        dtype: cast floating-point weights (``bfloat16``, ``float16``, ``float32`` or a ``torch.dtype``); buffers the
            model computes itself (rotary frequencies) keep theirs.
        truncate_dim: ``model.truncate_dim``, the width ``encode`` keeps (Matryoshka); default the saved one, if any.
        similarity_fn_name: ``model.similarity_fn_name`` (``cosine``, ``dot``, ``euclidean``, ``manhattan``); default
            the saved ``similarity``. Both as sentence-transformers' ``SentenceTransformer(..., truncate_dim=,
            similarity_fn_name=)``.

    Raises:
        FileNotFoundError: not a model directory.
        ModelDirError: a config that is not JSON, an unknown ``format_version``, a path that leaves the
            directory, a hub id, or a remote-code request without the caller's opt-in (names file and key).
    """
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    directory = Path(directory)
    api.check_truncate_dim(truncate_dim)  # before anything is built; the width is checked once it is known
    similarity_fn_name = api.check_similarity_fn_name(similarity_fn_name) if similarity_fn_name else None
    cfg_path, model_dict, weights = io.resolve_model_dir(directory, trust_remote_code)
    cfg = model_cfg_from_dict(model_dict, source=str(cfg_path))
    if isinstance(dtype, str) and dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    cast = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    with io.offline(), init_empty_weights(include_buffers=False):
        model = build_from_cfg(cfg)
    aliases = _shared_parameters(model)
    state = load_file(str(weights), device=str(device) if device is not None else "cpu")
    if cast is not None:
        state = {k: v.to(cast) if v.is_floating_point() else v for k, v in state.items()}
    for alias, owner in aliases.items():  # tied weights are stored once
        if owner in state:
            state.setdefault(alias, state[owner])
    model.load_state_dict(state, strict=True, assign=True)
    for alias, owner in aliases.items():  # assign replaced one of the two: tie them again
        _set(model, alias, model.get_parameter(owner))
    model.eval()
    if device is not None:
        model.to(device)  # the buffers built on the CPU
    meta = io.read_config(cfg_path)  # checked: mmembed.api.saved_settings_problem
    model.similarity_fn_name = similarity_fn_name or meta.get("similarity")
    model.truncate_dim = api.check_truncate_dim(truncate_dim or meta.get("truncate_dim"), model.embed_dim)
    model.matryoshka_dims = tuple(meta["matryoshka_dims"]) if meta.get("matryoshka_dims") else None
    return model


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _shared_parameters(model: torch.nn.Module) -> dict[str, str]:
    """``{alias: first name}`` of parameters registered under several names (tied embeddings)."""
    seen: dict[int, str] = {}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            out[name] = seen[id(p)]
        else:
            seen[id(p)] = name
    return out


def _set(model: torch.nn.Module, name: str, value: torch.nn.Parameter) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, value)
