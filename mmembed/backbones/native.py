"""Shared machinery for native VLM backbones: the transformers model keeps its own vision tower and projector.

A native backbone (``native = True``) owns the whole HF base model (``Qwen2VLModel``, ``LlavaModel``: vision
tower + projector + LLM, no LM head) and its HF processor. mmembed's :class:`NativeProcessor` turns
:class:`~mmembed.data.sample.Side` rows into exactly what the HF processor would give for the VLM2Vec layout
(``<image tokens> instruction text``, ANCHORS.md §1.3), and :meth:`NativeVLM.forward_native` runs the HF
model's own forward on it (ALGORITHMS.md §8: the HF hook points; Qwen2-VL computes its M-RoPE positions from
``input_ids``, ``attention_mask`` and ``image_grid_thw`` itself). The pooler, fusion and projection of
:class:`~mmembed.model.EmbeddingModel` then apply as for any backbone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmembed.backbones.base import Backbone, hidden_of
from mmembed.backbones.native_processor import NativeProcessor
from mmembed.backbones.splice import Spliced, VisualItem, splice_visual

__all__ = ["NativeVLM", "NativeProcessor", "DTYPES", "VLM2VEC_LORA_TARGETS"]

log = logging.getLogger(__name__)

#: VLM2Vec's LoRA targets, matched by module-name suffix (ANCHORS.md §1.8). They hit every LLM projection; in the
#: vision tower they hit CLIP/SigLIP attention (q/k/v/out_proj, LLaVA) and the Qwen2.5-VL ViT MLP, not the Qwen2-VL
#: ViT (qkv, proj, fc1/fc2) nor any projector/merger.
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


class NativeVLM(Backbone):
    """Base class of native VLM backbones; subclasses set ``image_text`` / ``model_keys`` and build the model and
    processor in ``__init__`` (then call :meth:`_setup`), see qwen2_vl.py and llava.py.

    ``self.model`` is the HF base model (no LM head); LoRA (``train.lora``) wraps it with peft and the wrapped
    model is called the same way. ``forward`` (text-only ``inputs_embeds`` through the language model) keeps
    the generic backbone contract; embedding models call :meth:`forward_native`.
    """

    native = True
    supports_merge = True  # a pre-LLM token reducer (``merge``) between the vision tower and the LLM
    supports_prune = True  # an in-LLM reducer (``prune``): the language model runs layer by layer
    image_text: str = "<image>"
    #: HF model inputs taken from a processor batch
    model_keys: tuple[str, ...] = ("input_ids", "attention_mask", "pixel_values")

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

    def _check_image_token(self, source: str) -> int:
        """The model's image token id; a processor whose tokenizer maps the image token elsewhere is refused."""
        from mmembed.config import ConfigError

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

    def make_processor(self, cfg: Any) -> NativeProcessor:
        """The processor an :class:`~mmembed.model.EmbeddingModel` uses with this backbone."""
        return NativeProcessor(
            self.hf_processor,
            image_text=self.image_text,
            image_token_id=self.image_token_id,
            placeholder=cfg.image_placeholder,
            image_tokens=self.tokens_per_image(),
            padding_side=cfg.padding_side,
            add_eos=self.add_eos,
            max_pixels=cfg.max_pixels,
            max_images=cfg.max_images_per_input,
            max_length=cfg.max_length,
        )

    def tokens_per_image(self) -> int:
        """Visual tokens per image (an upper bound where it varies per image)."""
        raise NotImplementedError

    def language_model(self) -> Any:
        return self.base_model().language_model

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        all_layers: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """(B, L, d) embeddings through the language model (no vision tower) with (B, L) positions, or (3, B, L)
        M-RoPE ids for Qwen2-VL."""
        out = self.language_model()(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=all_layers,
            use_cache=False,
        )
        return hidden_of(out, all_layers)

    # ------------------------------------------------------------------------------------------
    # visual tokens: the built-in projector or an mmembed connector, then the optional reducer

    mrope = False  # positions are (3, B, L) M-RoPE ids (Qwen2-VL) rather than (B, L)

    def base_model(self) -> Any:
        """The HF base model under a peft wrapper, if any."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    @property
    def connector(self) -> Any:
        """The mmembed connector that replaced the built-in projector, or ``None``."""
        ref = self.__dict__.get("_connector_ref")
        return ref[0] if ref else None

    def attach_connector(self, connector: nn.Module) -> None:
        """Replace the built-in projector (LLaVA's ``multi_modal_projector``, Qwen's ``visual.merger``) by
        ``connector``. The :class:`~mmembed.model.EmbeddingModel` owns it (saved and trained as ``connector.*``,
        outside peft's frozen base model); the backbone only holds a reference, never a second registration."""
        self.__dict__["_connector_ref"] = [connector]
        self._install_connector(connector)

    def vision_tower(self) -> nn.Module:
        """The model's own vision tower (what ``train.freeze: [vision]`` freezes)."""
        raise NotImplementedError

    def connector_in_dim(self) -> int:
        """Width of the vision features a replacing connector receives."""
        raise NotImplementedError

    def _install_connector(self, connector: nn.Module) -> None:
        raise NotImplementedError

    def image_features(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per-image (N_k, d) tokens at the LLM width (built-in projector or connector), in batch order."""
        raise NotImplementedError

    def image_items(self, batch: dict[str, torch.Tensor]) -> list[VisualItem]:
        """Per-image tokens with their relative positions (see :mod:`mmembed.backbones.splice`)."""
        raise NotImplementedError

    def needs_splice(self, reducer: Any) -> bool:
        """Whether the HF forward must be bypassed (the visual token count or positions change)."""
        return reducer is not None or self.connector is not None

    def spliced_inputs(self, batch: dict[str, torch.Tensor], reducer: Any = None) -> Spliced:
        """The batch rebuilt around each image's (connector, then merged) tokens, with recomputed positions."""
        items = self.image_items(batch)
        if reducer is not None and getattr(reducer, "pre_llm", False):
            merged = []
            for item in items:
                tokens, idx = reducer.reduce(item.tokens[None])  # (1, N', d), (1, N') survivors in order
                merged.append(item.select(idx[0], tokens[0]))
            items = merged
        ids = batch["input_ids"]
        pool = batch.get("pool_mask", batch["attention_mask"])
        return splice_visual(self.embed(ids), ids, batch["attention_mask"], pool, items, self.image_token_id)

    def forward_native(
        self, batch: dict[str, torch.Tensor], all_layers: bool = False, reducer: Any = None, uniform: bool = False
    ) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
        """A :class:`NativeProcessor` batch through the model.

        Without a connector swap or reducer this is the HF model's own forward. Otherwise the visual tokens are
        computed here (connector, then a pre-LLM merge), spliced with positions computed by mmembed, and run
        through the language model, layer by layer with pruning when the reducer prunes inside the LLM (AIM).

        Returns the last hidden state (B, L', d) (after the final norm), or every layer's output, and the
        attention and pool masks (B, L') they align with (the batch's own unless the sequence was rebuilt;
        pruned tokens are 0 in both). ``uniform``: on a text-only batch, run the visual path on one blank image
        and add it times 0, so every rank and GradCache chunk runs the same modules (ZeRO-2/3 and DDP need it).
        """
        pixels = batch.get("pixel_values")
        text_only = pixels is None or pixels.shape[0] == 0
        if not text_only and self.needs_splice(reducer):
            sp = self.spliced_inputs(batch, reducer)
            pos = sp.position_ids if self.mrope else sp.position_ids[0]
            if reducer is not None and getattr(reducer, "in_llm", False):
                from mmembed.tokens.prune import pruned_forward

                hidden, kept = pruned_forward(
                    self.language_model(), sp.embeds, sp.attention_mask, pos, sp.visual, reducer, all_layers=all_layers
                )
                return hidden, sp.attention_mask * kept, sp.pool_mask * kept
            return self.forward(sp.embeds, sp.attention_mask, pos, all_layers), sp.attention_mask, sp.pool_mask
        kwargs = {k: batch[k] for k in self.model_keys if k in batch and batch[k] is not None}
        if text_only:
            kwargs.pop("pixel_values", None)
        else:
            kwargs["pixel_values"] = kwargs["pixel_values"].to(self.model_dtype())
        out = self.model(**kwargs, output_hidden_states=all_layers, use_cache=False)
        hidden = hidden_of(out, all_layers)
        if uniform and text_only:
            zero = 0.0 * self.blank_visual()
            hidden = (*hidden[:-1], hidden[-1] + zero.to(hidden[-1].dtype)) if all_layers else hidden + zero
        mask = batch["attention_mask"]
        return hidden, mask, batch.get("pool_mask", mask)

    def blank_visual(self) -> torch.Tensor:
        """Sum of the visual path's output (tower + projector or connector) on one blank 64 px image (a scalar)."""
        from PIL import Image

        if getattr(self, "_blank", None) is None:
            enc = self.hf_processor.image_processor(images=[Image.new("RGB", (64, 64))], return_tensors="pt")
            self._blank = {k: v for k, v in enc.items() if k in ("pixel_values", "image_grid_thw", "image_sizes")}
        device = next(self.base_model().parameters()).device
        feats = self.image_features({k: v.to(device) for k, v in self._blank.items()})
        return sum(f.sum() for f in feats)

    def add_placeholder(self, token: str) -> int:
        """Native models keep their own image token; mmembed's placeholder is rewritten by the processor."""
        return self.image_token_id

    def export(self, directory: Path) -> dict[str, Any]:
        """Write ``backbone/`` (the HF config) and ``processor/`` (tokenizer + image processor)."""
        return self._export_hf(directory, {"processor": self.hf_processor})


def load_hf_processor(spec: str) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(spec)


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
