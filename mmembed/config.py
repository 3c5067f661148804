"""Typed recipe configuration: dataclasses, YAML recipes and ``key=value`` overrides.

A recipe is YAML merged with command-line overrides by OmegaConf, then converted into the
dataclasses below with validation before anything heavy is built (litgpt's typed config,
torchtune's signature check). Model slots (``model.vision``, ``model.connector``, ...) are
small dicts ``{type: NAME, **args}``: ``type`` picks a registered component and the other keys
are checked against that component's constructor.

Every problem is a :class:`ConfigError` naming the key path, the recipe file and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmembed.registry import ALL, LOSSES, import_module, slot_args
from mmembed.types import ConfigError

__all__ = [
    "ConfigError",
    "ModelCfg",
    "DataCfg",
    "TrainCfg",
    "RecipeCfg",
    "load_recipe",
    "model_cfg_from_dict",
    "slot_type",
    "slot_args",
    "upgrade_model_dict",
    "iter_keys",
    "check_metric_name",
]

log = logging.getLogger(__name__)

#: ``model.layout`` values: ``mmembed`` (docs/data.md, "Layout") and ``vlm2vec`` (VLM2Vec's own, docs/mmeb.md §1.3)
LAYOUTS = ("mmembed", "vlm2vec")

SLOTS = ("vision", "connector", "merge", "prune", "backbone", "pooler", "fusion")


@dataclass
class ModelCfg:
    """The embedding model: one dict per slot, each ``{type: NAME, **args}``.

    ``merge`` reduces each image's visual tokens before the LLM, ``prune`` drops visual tokens inside it (AIM sets
    both, docs/algorithms.md §5); a format-1 ``reducer`` is converted by :func:`upgrade_model_dict`.
    """

    backbone: dict[str, Any] = field(default_factory=dict)
    vision: dict[str, Any] | None = None
    connector: dict[str, Any] | None = None
    merge: dict[str, Any] | None = None
    prune: dict[str, Any] | None = None
    pooler: dict[str, Any] = field(default_factory=lambda: {"type": "last_token"})
    fusion: dict[str, Any] | None = None
    embed_dim: int | None = None  # optional linear projection of the pooled vector
    normalize: bool = True
    max_length: int = 512  # text tokens per input; image tokens come on top and are never cut
    padding_side: str = "left"
    image_placeholder: str = "<image>"
    max_images_per_input: int = 8
    max_pixels: int = 89_478_485  # PIL's default decompression-bomb limit, enforced before decoding
    prompts: dict[str, str] = field(default_factory=dict)  # named instructions, e.g. {query: "..."}
    # how a row becomes a sequence: mmembed's own, or VLM2Vec's exact text layout, special tokens and positions
    layout: str = "mmembed"

    def validate(self, prefix: str = "model") -> None:
        if not self.backbone:
            raise ConfigError(f"{prefix}.backbone", "a backbone is required, e.g. {type: hf_causal_lm, name: ...}")
        for slot in SLOTS:
            node = getattr(self, slot)
            if node is None:
                continue
            _check_slot(f"{prefix}.{slot}", node, ALL[slot])
        ALL["backbone"].get(self.backbone["type"]).check_slots(self, prefix)  # which slots this backbone takes
        _choice(f"{prefix}.layout", self.layout, LAYOUTS)
        if self.padding_side not in ("left", "right"):
            raise ConfigError(f"{prefix}.padding_side", f"expected 'left' or 'right', got {self.padding_side!r}")
        if self.max_length < 2:
            raise ConfigError(f"{prefix}.max_length", f"must be >= 2, got {self.max_length}")
        if self.embed_dim is not None and self.embed_dim <= 0:
            raise ConfigError(f"{prefix}.embed_dim", f"must be positive or null, got {self.embed_dim}")
        _at_least(f"{prefix}.max_pixels", self.max_pixels, 1)
        _at_least(f"{prefix}.max_images_per_input", self.max_images_per_input, 1)
        for key, name, value in iter_keys(self.vision, f"{prefix}.vision"):
            if name in _POSITIVE_SIZES and value is not None:
                _at_least(key, value, 1)


@dataclass
class DataCfg:
    """Where the training and evaluation data come from (see mmembed.data)."""

    train: str | None = None  # a manifest YAML, a directory of MMEB parquet/JSONL files, or one file
    eval: str | None = None
    # default: an images/ or eval_images/ folder beside the data when there is one (MMEB downloads), else each
    # data file's folder (mmembed.data.manifest, docs/mmeb_parsing.md §4)
    image_root: str | None = None
    strict: bool = False  # raise on the first bad sample instead of skipping and counting it
    num_workers: int = 0
    max_pixels: int = 89_478_485
    homogeneous: bool = False  # each global batch from one dataset
    num_negatives: int = 0  # hard negatives per query fed to the loss
    shuffle_buffer: int = 1000
    group_by_length: bool = True

    def validate(self, prefix: str = "data") -> None:
        if self.num_workers < 0:
            raise ConfigError(f"{prefix}.num_workers", f"must be >= 0, got {self.num_workers}")
        if self.num_negatives < 0:
            raise ConfigError(f"{prefix}.num_negatives", f"must be >= 0, got {self.num_negatives}")
        _at_least(f"{prefix}.max_pixels", self.max_pixels, 1)
        _at_least(f"{prefix}.shuffle_buffer", self.shuffle_buffer, 0, "(0 turns shuffling off)")

    def check_paths(self, prefix: str = "data") -> None:
        """The files and folders this config names exist (``mmembed validate`` and ``mmembed train``)."""
        for key in ("train", "eval", "image_root"):
            value = getattr(self, key)
            if value and not Path(value).exists():
                raise ConfigError(f"{prefix}.{key}", f"{value} does not exist")


@dataclass
class TrainCfg:
    """The training loop (mmembed.train)."""

    output_dir: str = "runs/default"
    max_steps: int = 100
    batch_size: int = 8  # queries per rank per optimizer step
    optimizer: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    grad_clip: float = 1.0
    seed: int = 0
    save_every: int = 0
    eval_every: int = 0
    eval_metric: str = "overall"  # keeps <output_dir>/best: overall, a meta-task (RET), a mean (mrr) or DATASET/METRIC
    log_every: int = 1
    resume: str = "none"
    gradcache_chunk_size: int = 0
    zero_stage: int = 0
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    freeze: list[str] = field(default_factory=list)
    lora: dict[str, Any] | None = None
    max_bad_steps: int = 5
    deepspeed: str | None = None  # an explicit DeepSpeed JSON config; otherwise built from these keys
    export: bool = True  # write <output_dir>/final (full weights gathered, LoRA merged) when training ends
    overwrite: bool = False  # with resume=none, remove an earlier run's files in output_dir instead of refusing
    save_total_limit: int = 2  # keep the newest N complete checkpoints (0: keep all); never the one resumed from

    def validate(self, prefix: str = "train") -> None:
        _choice(f"{prefix}.optimizer", self.optimizer, ("adamw", "sgd"))
        _choice(f"{prefix}.schedule", self.schedule, ("cosine", "linear", "constant"))
        _choice(f"{prefix}.precision", self.precision, ("fp32", "bf16"))
        _choice(f"{prefix}.zero_stage", self.zero_stage, (0, 1, 2, 3))
        for slot in self.freeze:
            _choice(f"{prefix}.freeze", slot, ("vision", "connector", "backbone", "pooler", "fusion"))
        if self.batch_size < 1:
            raise ConfigError(f"{prefix}.batch_size", f"must be >= 1, got {self.batch_size}")
        if self.gradcache_chunk_size < 0 or self.gradcache_chunk_size > self.batch_size:
            raise ConfigError(
                f"{prefix}.gradcache_chunk_size",
                f"must be 0 (off) or between 1 and train.batch_size={self.batch_size}, got {self.gradcache_chunk_size}",
            )
        if self.max_steps < 1:
            raise ConfigError(f"{prefix}.max_steps", f"must be >= 1, got {self.max_steps}")
        if not self.lr >= 0:
            raise ConfigError(f"{prefix}.lr", f"must be >= 0, got {self.lr}")
        for key, low, note in (
            ("weight_decay", 0, ""),
            ("grad_clip", 0, "(0 turns clipping off)"),
            ("warmup_steps", 0, ""),
            ("save_every", 0, "(0: only at the end)"),
            ("eval_every", 0, "(0: no eval during training)"),
            ("log_every", 1, ""),
            ("max_bad_steps", 1, ""),
            ("save_total_limit", 0, "(0 keeps every checkpoint)"),
        ):
            _at_least(f"{prefix}.{key}", getattr(self, key), low, note)
        check_metric_name(f"{prefix}.eval_metric", self.eval_metric)
        if self.lora is not None:
            allowed = ("r", "alpha", "dropout", "target_modules", "use_dora", "init")
            for key in self.lora:
                if key not in allowed:
                    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.5)
                    hint = f" Did you mean '{close[0]}'?" if close else ""
                    raise ConfigError(f"{prefix}.lora.{key}", f"unknown LoRA key.{hint} Allowed: {', '.join(allowed)}")

    def check_paths(self, prefix: str = "train") -> None:
        """``train.resume`` and ``train.deepspeed`` name files that exist."""
        if self.resume not in ("none", "auto", "") and not Path(self.resume).is_dir():
            raise ConfigError(f"{prefix}.resume", f"{self.resume} is not a checkpoint folder (or use auto / none)")
        if self.deepspeed and not Path(self.deepspeed).is_file():
            raise ConfigError(f"{prefix}.deepspeed", f"DeepSpeed config not found: {self.deepspeed}")


@dataclass
class RecipeCfg:
    """A whole recipe: model, data, loss and training."""

    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    loss: dict[str, Any] = field(default_factory=lambda: {"type": "infonce"})
    train: TrainCfg = field(default_factory=TrainCfg)
    #: modules to import before anything is checked, so their components register (a user's own connector)
    imports: list[str] = field(default_factory=list)
    source: str | None = field(default=None, metadata={"internal": True})

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        self.train.validate()
        _check_slot("loss", self.loss, LOSSES)
        dims, width = self.loss.get("matryoshka_dims"), self.model.embed_dim
        if dims and width and max(dims) > width:  # without a projection the width is known once built (the loss checks)
            raise ConfigError(
                "loss.matryoshka_dims", f"{max(dims)} exceeds the embedding width (model.embed_dim={width})"
            )

    def check_paths(self) -> None:
        """Every data path, image root, checkpoint and DeepSpeed JSON the recipe names exists (names the key)."""
        try:
            self.data.check_paths()
            self.train.check_paths()
        except ConfigError as e:
            raise ConfigError(e.key, e.message, self.source) from None


# ----------------------------------------------------------------------------------------------
# Slots


def slot_type(node: dict[str, Any] | None) -> str | None:
    return None if node is None else node.get("type")


_MERGE_KEYS = ("keep_ratio",)


def upgrade_model_dict(model: dict[str, Any], key: str = "model") -> dict[str, Any]:
    """A format-1 model config (one ``reducer`` slot) in today's form: ``reducer: {type: aim | merge | prune}``
    becomes ``merge: {type: aim, keep_ratio}`` and/or ``prune: {type: aim, schedule, ...}`` (same arguments, same
    behaviour: pruning in the ``fast`` mode, rows removed). Configs without ``reducer`` come back unchanged."""
    if "reducer" not in model:
        return model
    out = {k: v for k, v in model.items() if k != "reducer"}
    reducer = model["reducer"]
    if reducer is None:
        return out
    if not isinstance(reducer, dict) or reducer.get("type") not in ("aim", "merge", "prune"):
        raise ConfigError(f"{key}.reducer", f"expected {{type: aim | merge | prune, ...}}, got {reducer!r}")
    kind, args = reducer["type"], slot_args(reducer)
    if kind in ("aim", "merge"):
        out["merge"] = {"type": "aim", **{k: v for k, v in args.items() if k in _MERGE_KEYS}}
    if kind in ("aim", "prune"):
        # format 1 removed pruned rows: the ``fast`` mode, so a saved model keeps its numbers
        out["prune"] = {"type": "aim", "mode": "fast", **{k: v for k, v in args.items() if k not in _MERGE_KEYS}}
    return out


def _check_slot(key: str, node: Any, registry: Any) -> None:
    if not isinstance(node, dict):
        raise ConfigError(key, f"expected a mapping with a 'type' key, got {type(node).__name__}")
    name = node.get("type")
    if name is None:
        raise ConfigError(f"{key}.type", f"missing; allowed: {', '.join(registry.names())}")
    if name not in registry:
        raise ConfigError(f"{key}.type", registry.unknown_message(name))
    problems = registry.check_args(name, slot_args(node))
    if problems:
        raise ConfigError(key, "; ".join(problems))
    check = getattr(registry.get(name), "check_config", None)
    if check is not None:
        try:
            check(slot_args(node))
        except ConfigError as e:  # re-root the component's own key
            raise ConfigError(f"{key}.{e.key}" if e.key else key, e.message) from None


_POSITIVE_SIZES = ("image_size", "patch_size")
_METRIC = re.compile(r"^(official_)?((hit|recall|ndcg|mrr)@[1-9][0-9]*|mrr)$")
_GROUP = re.compile(r"^[A-Z][A-Z0-9_]*$")  # meta-tasks (CLS, VQA, RET, VG, custom) and splits (IND, OOD)


def check_metric_name(key: str, name: str) -> None:
    """``train.eval_metric``: overall, a mean metric (``mrr``, ``hit@5``), a meta-task or split, ``DATASET/METRIC``."""
    if name in ("overall", "official", "hit@1", "mean_hit@1") or _METRIC.match(name) or _GROUP.match(name):
        return
    if "/" in name and _METRIC.match(name.rsplit("/", 1)[1]) and name.rsplit("/", 1)[0]:
        return
    raise ConfigError(
        key,
        f"unknown eval metric {name!r}; allowed: overall, official (MMEB-official overall), mrr, hit@K, recall@K, "
        "ndcg@K (each also as official_...), a meta-task or split in "
        "capitals (CLS, VQA, RET, VG, IND, OOD), or DATASET/METRIC (e.g. N24News/hit@1)",
    )


def _at_least(key: str, value: Any, low: float, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
        raise ConfigError(key, f"must be >= {low}{' ' + note if note else ''}, got {value!r}")


def iter_keys(node: Any, path: str) -> Any:
    """``(dotted key, key, value)`` for every entry of nested dicts and lists."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield f"{path}.{k}", k, v
            yield from iter_keys(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from iter_keys(v, f"{path}[{i}]")


def _choice(key: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(key, f"got {value!r}.{hint} Allowed: {', '.join(str(a) for a in allowed)}")


# ----------------------------------------------------------------------------------------------
# Conversion from plain containers to dataclasses, with key paths in every error


def _from_container(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(path or "<root>", f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(full, f"unknown key.{hint} Allowed: {', '.join(fields)}")
        kwargs[key] = _coerce(hints[key], value, full)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, path)
            except ConfigError as e:
                errors.append(e.message)
        raise ConfigError(path, errors[0] if errors else f"unexpected value {value!r}")
    if dataclasses.is_dataclass(tp):
        return _from_container(tp, value, path)
    if tp is Any:
        return value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {value!r}")
        return dict(value)
    if origin is list or tp is list:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            if isinstance(value, str):  # `freeze=vision,connector` on the command line
                return [v for v in value.split(",") if v]
            raise ConfigError(path, f"expected a list, got {value!r}")
        return list(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(path, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(path, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(path, f"expected a string, got {value!r}")
    return value


def model_cfg_from_dict(data: dict[str, Any], source: str | None = None) -> ModelCfg:
    """Build and validate a :class:`ModelCfg` from a plain dict (a saved ``mmembed_config.json``, upgraded)."""
    try:
        cfg = _from_container(ModelCfg, upgrade_model_dict(data), "model")
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(e.key, e.message, source) from None
    return cfg


def load_recipe(
    recipe: str | os.PathLike | dict[str, Any] | RecipeCfg, overrides: list[str] | None = None
) -> RecipeCfg:
    """Read a YAML recipe (or a dict), apply ``key=value`` overrides, convert and validate.

    Args:
        recipe: a YAML path, a plain dict, or an existing :class:`RecipeCfg` (overrides still apply).
        overrides: command-line style ``a.b=value`` strings; values are parsed as YAML.

    Raises:
        ConfigError: naming the key path and the recipe file.
    """
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    source = None
    if isinstance(recipe, RecipeCfg):
        source = recipe.source
        base = OmegaConf.create(_to_plain(recipe))
    elif isinstance(recipe, dict):
        base = OmegaConf.create(recipe)
    else:
        source = str(recipe)
        if not Path(source).is_file():
            raise ConfigError("", f"recipe file not found: {source}")
        base = _load_yaml(Path(source), [])
    for item in overrides or []:
        if "=" not in item or item.startswith("="):
            raise ConfigError(item, "an override must look like key=value (e.g. train.lr=1e-5)", source)
        key = item.split("=", 1)[0]
        try:
            value = OmegaConf.select(OmegaConf.from_dotlist([item]), key)
            if isinstance(value, DictConfig) and "type" in value:  # a whole slot: replace it, don't merge args
                OmegaConf.update(base, key, value, merge=False)
            else:
                base = OmegaConf.merge(base, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise ConfigError(item.split("=", 1)[0], f"cannot apply override: {e}", source) from None
    try:
        data = OmegaConf.to_container(base, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError("", f"cannot resolve recipe: {e}", source) from None
    data = data or {}
    try:
        _import_recipe_modules(data.get("imports"))
        if isinstance(data.get("model"), dict) and "reducer" in data["model"]:
            log.warning("%s: model.reducer is now model.merge + model.prune; converted", source or "recipe")
            data["model"] = upgrade_model_dict(data["model"])
        cfg = _from_container(RecipeCfg, data, "")
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(e.key, e.message, source) from None
    cfg.source = source
    return cfg


def _import_recipe_modules(imports: Any) -> None:
    """``imports: [my_pkg.my_connector, ...]``: imported first, so the components they register can be named."""
    if imports is None:
        return
    if not isinstance(imports, list) or not all(isinstance(m, str) and m for m in imports):
        raise ConfigError("imports", f"expected a list of module names, got {imports!r}")
    for i, name in enumerate(imports):
        try:
            import_module(name, f"imports[{i}]")
        except ImportError as e:
            raise ConfigError(f"imports[{i}]", str(e).split(": ", 1)[1]) from None


def _load_yaml(path: Path, seen: list[Path]) -> Any:
    """A YAML recipe; a top-level ``base: other.yaml`` (relative to this file) is loaded first and
    this file merged on top, so a recipe can say only what differs from another."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if path.resolve() in seen:
        raise ConfigError("base", f"recipes include each other in a cycle: {' -> '.join(map(str, seen))}", str(path))
    if not path.is_file():
        raise ConfigError("base", f"recipe file not found: {path}", str(seen[-1]) if seen else None)
    try:
        node = OmegaConf.load(path)
    except (OmegaConfBaseException, OSError, ValueError) as e:
        raise ConfigError("", f"cannot parse YAML: {e}", str(path)) from None
    if not isinstance(node, DictConfig):
        raise ConfigError("", "a recipe must be a mapping of sections (model, data, loss, train)", str(path))
    parent = node.pop("base", None)
    if parent is None:
        return node
    return OmegaConf.merge(_load_yaml(path.parent / str(parent), [*seen, path.resolve()]), node)


def _to_plain(cfg: Any) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    out.pop("source", None)
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as plain JSON-able data (internal fields removed)."""
    return _to_plain(cfg)
