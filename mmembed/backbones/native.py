"""Native VLM backbones: the transformers model keeps its own vision tower, projector and processor.

A native backbone owns the whole HF base model (``Qwen2VLModel``, ``LlavaModel``: vision tower + projector + LLM, no
LM head) and its HF processor; :class:`~mmembed.processing.NativeProcessor` lays rows out as VLM2Vec does
(``<image tokens> instruction text``, docs/data.md) and the HF processor expands the images. Its visual path
(:class:`NativeVisual`) is stock (``None`` rows: the HF model's own forward embeds the images, bit-exact with
transformers; Qwen2-VL then computes its M-RoPE positions itself, docs/algorithms.md §8) unless an mmembed connector
that changes the tokens, a merger or a pruner is configured: then the rows are computed here and spliced with
positions computed by mmembed (:mod:`mmembed.backbones.splice`), and the LLM runs on them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmembed.backbones.base import Backbone, hidden_of
from mmembed.backbones.video import VideoBackbone, check_stock
from mmembed.types import ConfigError
from mmembed.visual import VisualItem, VisualPath, has_pixels, merge_items

__all__ = ["NativeVLM", "NativeVisual", "ModuleRef", "DTYPES", "VLM2VEC_LORA_TARGETS", "set_image_backend"]

#: VLM2Vec's LoRA targets, matched by module-name suffix (docs/mmeb.md §1.8). They hit every LLM
#: projection; in the vision tower they hit CLIP/SigLIP attention (q/k/v/out_proj, LLaVA) and the Qwen2.5-VL ViT
#: MLP, not the Qwen2-VL ViT (qkv, proj, fc1/fc2) nor any projector/merger.
VLM2VEC_LORA_TARGETS = [
    "qkv_proj",
    "o_proj",
    "gate_up_proj",
    "down_proj",
    "k_proj",
    "q_proj",
    "out_proj",
    "v_proj",
    "gate_proj",
    "up_proj",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModuleRef:
    """A reference to a module another module owns, kept out of ``nn.Module`` registration (so its weights are
    saved, trained and sharded once, under their owner's name). Calling it calls the module."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


class NativeVLM(VideoBackbone, Backbone):
    """Base class of native VLM backbones; subclasses set ``image_text`` / ``model_keys`` and build the model and
    processor in ``__init__`` (then call :meth:`_setup`), see qwen2_vl.py and llava.py.

    ``self.model`` is the HF base model (no LM head); LoRA (``train.lora``) wraps it with peft and the wrapped
    model is called the same way.
    """

    processor = "hf"
    image_text: str = "<image>"
    #: HF model inputs taken from a processor batch
    model_keys: tuple[str, ...] = ("input_ids", "attention_mask", "pixel_values")
    #: per-image tensors of a batch besides ``pixel_values`` (GradCache splits them by the rows' image counts)
    image_keys: tuple[str, ...] = ()
    #: a (N_img, 3) key whose row product is each image's number of ``pixel_values`` rows (Qwen's flat patches)
    patch_grid_key: str | None = None
    layouts = ("mmembed", "vlm2vec")
    #: ``layout: vlm2vec``: the text of each leading image, VLM2Vec's bare image token and a space
    #: (``process_input_text`` in VLM2Vec's ``src/model/processor.py``: ``image_token + " " + prompt``)
    vlm2vec_image_token: str = "<image>"

    def use_layout(self, layout: str) -> None:
        """``vlm2vec``: VLM2Vec's sequence (docs/mmeb.md, "VLM2Vec's layout"): the bare image token (no
        vision-start/end markup) and a space before the instruction, no EOS (its processor calls add none, and
        last-token pooling reads the last text token); Qwen's positions are 1-D (see :class:`Qwen2VL`)."""
        super().use_layout(layout)
        if layout == "vlm2vec":
            self.add_eos = False

    @property
    def lead_text(self) -> str:
        """The processor's text for each image that starts a row."""
        return self.vlm2vec_image_token + " " if self.layout == "vlm2vec" else self.image_text

    @property
    def inline_text(self) -> str:
        """The processor's text for an image inside the text (VLM2Vec replaces its placeholder in place)."""
        return self.vlm2vec_image_token if self.layout == "vlm2vec" else self.image_text

    @property
    def text_positions(self) -> bool:
        """Whether the processor gives 1-D ``position_ids`` (B, L) the model must use as they are."""
        return False

    def _setup(self, model: Any, processor: Any, add_eos: bool, dtype: str, source: str) -> None:
        self.model = model
        self.hf_processor = processor
        self.tokenizer = processor.tokenizer
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        text_cfg = model.config.get_text_config()
        self.hidden_size = int(text_cfg.hidden_size)
        self.num_layers = int(text_cfg.num_hidden_layers)
        self.add_eos = add_eos and self.tokenizer.eos_token_id is not None
        self._dtype_name = dtype
        self.image_token_id = self._check_image_token(source)
        self._blank: dict[str, torch.Tensor] | None = None

    def _check_image_token(self, source: str) -> int:
        """The model's image token id; a processor whose tokenizer maps the image token elsewhere is refused."""
        token = getattr(self.hf_processor, "image_token", None) or self.image_token
        model_id = int(self.model.config.image_token_id)
        tok_id = self.tokenizer.convert_tokens_to_ids(token)
        if tok_id is None or int(tok_id) != model_id:
            raise ConfigError(
                "model.backbone.config.image_token_id",
                f"the model's image_token_id is {model_id} but the processor's tokenizer ({source}) maps "
                f"{token!r} to {tok_id}: processor and model do not match",
            )
        return model_id

    @property
    def image_token(self) -> str:
        return self.image_text

    def model_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def tokens_per_image(self) -> int:
        """Visual tokens per image (an upper bound where it varies per image)."""
        raise NotImplementedError

    def language_model(self) -> Any:
        return self.base_model().language_model

    def base_model(self) -> Any:
        """The HF base model under a peft wrapper, if any."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    # ------------------------------------------------------------------------------------------
    # what the builder asks

    @classmethod
    def check_slots(cls, cfg: Any, prefix: str = "model") -> None:
        """A native VLM has its own tower: ``model.vision`` and ``model.fusion`` are refused; ``model.connector``
        replaces its projector; merge and prune act on its visual tokens."""
        for slot in ("vision", "fusion"):
            if getattr(cfg, slot) is not None:
                raise ConfigError(
                    f"{prefix}.{slot}",
                    f"backbone '{cfg.backbone['type']}' has its own vision tower; model.{slot} is not supported with "
                    "it (leave it out; model.connector replaces its projector)",
                )

    def visual_path(
        self, vision: nn.Module | None, connector: nn.Module | None, merger: nn.Module | None, pruner: Any
    ) -> NativeVisual:
        """The model's own tower and projector, or ``connector`` in the projector's place (installed here)."""
        changes_tokens = False
        if connector is not None:
            connector.to(self.model_dtype())
            changes_tokens = self._install_connector(connector)
        stock = merger is None and pruner is None and not changes_tokens
        return NativeVisual(self, connector, merger, stock)

    def connector_in_dim(self) -> int:
        """Width of the vision features a replacing connector receives."""
        raise NotImplementedError

    def _install_connector(self, connector: nn.Module) -> bool:
        """Put ``connector`` in the built-in projector's place; return whether the HF forward can no longer produce
        the visual tokens itself (mmembed must splice them)."""
        raise NotImplementedError

    def vision_tower(self) -> nn.Module:
        """The model's own vision tower (what ``train.freeze: [vision]`` freezes)."""
        raise NotImplementedError

    def add_placeholder(self, token: str) -> int:
        """Native models keep their own image token; mmembed's placeholder is rewritten by the processor."""
        return self.image_token_id

    add_image_token = add_placeholder

    # ------------------------------------------------------------------------------------------
    # visual tokens and forward

    def image_items(self, batch: dict[str, torch.Tensor], connector: nn.Module | None) -> list[VisualItem]:
        """Per-image tokens with their relative positions (see :mod:`mmembed.backbones.splice`)."""
        raise NotImplementedError

    def image_features(self, batch: dict[str, torch.Tensor], connector: nn.Module | None) -> list[torch.Tensor]:
        """Per-image (N_k, d) tokens at the LLM width (built-in projector or connector), in batch order."""
        raise NotImplementedError

    def blank_visual(self, connector: nn.Module | None) -> torch.Tensor:
        """Sum of the visual path's output (tower + projector or connector) on one blank 64 px image (a scalar)."""
        from PIL import Image

        if self._blank is None:
            enc = self.hf_processor.image_processor(images=[Image.new("RGB", (64, 64))], return_tensors="pt")
            self._blank = {k: v for k, v in enc.items() if k in ("pixel_values", "image_grid_thw", "image_sizes")}
        device = next(self.base_model().parameters()).device
        feats = self.blank_features({k: v.to(device) for k, v in self._blank.items()}, connector)
        return sum(f.sum() for f in feats)

    def blank_features(self, batch: dict[str, torch.Tensor], connector: nn.Module | None) -> list[torch.Tensor]:
        """Every output of the visual path on ``batch`` that :meth:`blank_visual` sums: the per-image (N_k, d)
        tokens, and in a subclass any other visual output the LLM reads (Qwen3-VL's DeepStack features)."""
        return self.image_features(batch, connector)

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        visual: list[VisualItem] | None = None,
        pruner: Any = None,
        all_layers: bool = False,
    ) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
        """Visual rows given: spliced by mmembed (base class). ``None``: the HF model's own forward on the batch
        (vision tower inside when the batch has images)."""
        if visual is not None:
            return super().forward(batch, visual, pruner, all_layers)
        kwargs = {k: batch[k] for k in self.model_keys if k in batch and batch[k] is not None}
        if not has_pixels(batch):
            kwargs.pop("pixel_values", None)
        else:
            kwargs["pixel_values"] = kwargs["pixel_values"].to(self.model_dtype())
        if "pixel_values_videos" in kwargs:  # the model's own video path (mmembed/backbones/video.py)
            kwargs["pixel_values_videos"] = kwargs["pixel_values_videos"].to(self.model_dtype())
        out = self.model(**kwargs, output_hidden_states=all_layers, use_cache=False)
        mask = batch["attention_mask"]
        return hidden_of(out, all_layers), mask, batch.get("pool_mask", mask)

    def export(self, directory: Path) -> dict[str, Any]:
        """Write ``backbone/`` (the HF config) and ``processor/`` (tokenizer + image processor)."""
        return self._export_hf(directory, {"processor": self.hf_processor})


class NativeVisual(VisualPath):
    """A native VLM's visual path: its tower, then its projector or an mmembed ``connector``, then a ``merger``.

    ``stock``: nothing changes the HF model's own visual tokens, so :meth:`__call__` gives ``None`` and the
    backbone's HF forward embeds the images itself.
    """

    def __init__(self, backbone: NativeVLM, connector: nn.Module | None, merger: nn.Module | None, stock: bool):
        self.backbone, self.connector, self.merger, self.stock = backbone, connector, merger, stock

    @property
    def tower(self) -> nn.Module:  # type: ignore[override]
        return self.backbone.vision_tower()

    def num_tokens(self) -> int:
        return self.backbone.tokens_per_image()

    def __call__(self, batch: dict[str, torch.Tensor]) -> list[VisualItem] | None:
        check_stock(batch, self.stock)
        if self.stock or not has_pixels(batch):
            return None
        items = self.backbone.image_items(batch, self.connector)
        return merge_items(items, self.merger) if self.merger is not None else items

    def blank(self) -> torch.Tensor:
        return self.backbone.blank_visual(self.connector)


def load_hf_processor(spec: str) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(spec)


IMAGE_BACKENDS = ("pil", "torchvision")


def set_image_backend(processor: Any, backend: str | None) -> None:
    """Give ``processor`` the image processor of ``backend`` with the same settings (``None``: keep it).

    transformers 5.x loads the torchvision-backed ``<Model>ImageProcessor`` by default, where transformers 4.x (and
    so VLM2Vec) used the PIL/NumPy one, kept as ``<Model>ImageProcessorPil``: resized pixels differ by up to 1.5e-2
    (bicubic resampling), about 2e-4 in the embedding. ``pil`` reproduces the 4.x numbers.
    """
    if backend is None:
        return
    if backend not in IMAGE_BACKENDS:
        raise ConfigError("model.backbone.image_backend", f"expected one of {IMAGE_BACKENDS}, got {backend!r}")
    import transformers

    ip = processor.image_processor
    if getattr(ip, "backend", None) == backend:
        return
    name = type(ip).__name__.removesuffix("Pil")
    target = getattr(transformers, name + "Pil" if backend == "pil" else name, None)
    if target is None:
        raise ConfigError(
            "model.backbone.image_backend", f"transformers has no {backend} version of {type(ip).__name__}"
        )
    processor.image_processor = target.from_dict(ip.to_dict())


def load_native(
    family: str,
    classes: dict[str, str],
    name: str | None,
    config: dict[str, Any] | None,
    pretrained: bool,
    processor: str | None,
    tiny: tuple[str, ...],
    dtype: str,
    attn: str,
) -> tuple[Any, str, str]:
    """(HF base model, its ``model_type``, the processor spec) for a native backbone ``family``.

    A checkpoint (``name``) wins over a tiny ``config`` and a ``tiny`` processor left in the recipe, so
    ``model.backbone.name=...`` on a tiny recipe loads the real model with its own processor.
    """
    if name:
        from transformers import AutoConfig

        config, model_type = None, AutoConfig.from_pretrained(name).model_type
        processor = None if processor in tiny else processor
    elif config is not None:
        model_type = config.get("model_type", family)
    else:
        raise ValueError(f"{family} needs 'name' (hub id or directory) or 'config'")
    if model_type not in classes:
        raise ValueError(f"{family}: model_type must be one of {', '.join(classes)}, got {model_type!r}")
    model = from_config_or_name(classes[model_type], name, config, pretrained, dtype, attn)
    spec = processor or name
    if spec is None:
        raise ValueError(f"{family} built from 'config' needs 'processor' (a directory, hub id or 'tiny')")
    return model, model_type, spec


def from_config_or_name(
    cls_name: str, name: str | None, config: dict[str, Any] | None, pretrained: bool, dtype: str, attn: str
) -> Any:
    """The HF base model (``<ForConditionalGeneration>.model``): from a config dict, or a hub id / directory.

    Loading through the ``ForConditionalGeneration`` class applies transformers' checkpoint key mapping (hub
    checkpoints store ``model.layers...`` / ``visual...``); the LM head is dropped.
    """
    import transformers

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    cls = getattr(transformers, cls_name)
    kw = {"dtype": DTYPES[dtype], "attn_implementation": attn}
    if config is not None:
        cfg_dict = dict(config)
        cfg_dict.pop("model_type", None)
        full = cls._from_config(cls.config_class(**cfg_dict), **kw)
    elif name:
        if pretrained:
            full = cls.from_pretrained(name, **kw)
        else:
            full = cls._from_config(transformers.AutoConfig.from_pretrained(name), **kw)
    else:
        raise ValueError("needs 'name' (hub id or directory) or 'config'")
    return full.model


#: The 2-layer, 64-wide text model of the tiny native twins (ids match mmembed's tiny tokenizer: pad 0, bos 2, eos 3).
TINY_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 1024,
    "bos_token_id": 2,
    "eos_token_id": 3,
    "pad_token_id": 0,
}
