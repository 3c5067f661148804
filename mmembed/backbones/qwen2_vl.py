"""Qwen2-VL and Qwen2.5-VL as native embedding backbones (VLM2Vec-V2, GME), through the transformers classes.

The HF base model (``Qwen2VLModel`` / ``Qwen2_5_VLModel``: ViT with 2x2 patch merger + Qwen2 LLM with M-RoPE,
Qwen2-VL paper arXiv 2409.12191) runs its own forward on the ``Qwen2VLProcessor`` output; dynamic resolution is
bounded by ``min_pixels`` / ``max_pixels`` (VLM2Vec-V2: 28*28*4 .. 28*28*1280, docs/mmeb.md §1.8); one visual
token covers 28x28 pixels. VLM2Vec pads Qwen on the left (docs/data.md, "Layout"). Videos go through the model's own
video path (``pixel_values_videos``, ``video_grid_thw``: :mod:`mmembed.backbones.video`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmembed.backbones.native import TINY_TEXT_CONFIG, NativeVLM, load_hf_processor, load_native, set_image_backend
from mmembed.backbones.video import QWEN_VIDEO_KEYS, check_video_config
from mmembed.registry import BACKBONES
from mmembed.tiny import build_tiny_tokenizer
from mmembed.types import ConfigError, InputError
from mmembed.visual import VisualItem, grid_positions, line_positions

__all__ = [
    "Qwen2VL",
    "build_tiny_qwen2vl_processor",
    "QWEN_SPECIAL_TOKENS",
    "TINY_QWEN2VL_CONFIG",
    "TINY_QWEN25VL_CONFIG",
]

QWEN_SPECIAL_TOKENS = ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"]
_CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}

#: A tiny random-init Qwen2-VL (hidden 64, 2+2 layers) whose special-token ids match the tiny processor.
TINY_QWEN2VL_CONFIG: dict[str, Any] = {
    "model_type": "qwen2_vl",
    "image_token_id": 400,
    "vision_start_token_id": 401,
    "vision_end_token_id": 402,
    "video_token_id": 403,
    "text_config": {
        **TINY_TEXT_CONFIG,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    },
    "vision_config": {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": 64,
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
}


#: Qwen2.5-VL twin: windowed ViT (``hidden_size`` is the ViT width, ``out_hidden_size`` the LLM's).
TINY_QWEN25VL_CONFIG: dict[str, Any] = {
    **TINY_QWEN2VL_CONFIG,
    "model_type": "qwen2_5_vl",
    "vision_config": {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "out_hidden_size": 64,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,
        "fullatt_block_indexes": [1],
    },
}


def build_tiny_qwen2vl_processor(min_pixels: int = 28 * 28 * 4, max_pixels: int = 28 * 28 * 16) -> Any:
    """An offline ``Qwen2VLProcessor``: mmembed's tiny tokenizer + the 4 Qwen vision tokens (ids 400-403); video
    frames get the images' pixel bounds."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tok = build_tiny_tokenizer()
    tok.add_tokens(QWEN_SPECIAL_TOKENS, special_tokens=True)
    image = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    video = Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    return Qwen2VLProcessor(image_processor=image, tokenizer=tok, video_processor=video)


@BACKBONES.register("qwen2_vl")
class Qwen2VL(NativeVLM):
    """Qwen2-VL / Qwen2.5-VL (``model_type`` picks the class) with its own ViT, merger and processor.

    Args:
        name: hub id or local directory (HF format); weights, processor and tokenizer load from it. When set,
            ``config`` and a ``tiny`` processor are ignored, so ``model.backbone.name=...`` on a tiny recipe loads
            the real checkpoint with its own processor.
        config: a config dict with ``model_type`` ``qwen2_vl`` or ``qwen2_5_vl`` for random init (tiny recipes).
        pretrained: load weights from ``name``.
        processor: processor directory / hub id, or ``tiny`` (offline test processor); defaults to ``name``.
        min_pixels, max_pixels: Qwen's dynamic-resolution bounds per image (28x28 pixels per visual token).
        dtype: ``float32`` / ``bfloat16`` / ``float16``.
        attn_implementation: ``sdpa`` (default), ``eager`` or ``flash_attention_2``.
        add_eos: append the tokenizer's EOS (last-token pooling reads it).
        image_backend: ``pil`` | ``torchvision``: the image processor's backend (``None``: the processor's own,
            torchvision in transformers 5.x). VLM2Vec ran transformers 4.51's PIL one (``recipes/vlm2vec*``: ``pil``).
        video: :class:`~mmembed.video.VideoOptions` keys (``fps``, ``max_frames``, ``min_pixels``, ...; docs/video.md);
            ``factor`` defaults to patch * merge (28), ``frame_multiple`` to ``temporal_patch_size`` (2).

    ``model.layout: vlm2vec`` (VLM2Vec's sequence, docs/mmeb.md): ``<|image_pad|>`` then a space, no
    ``<|vision_start|>``/``<|vision_end|>``, no EOS, and 1-D positions for every token. VLM2Vec's bundled Qwen2-VL
    finds images for M-RoPE through the vision-start token (``get_rope_index`` in its
    ``src/model/vlm_backbone/qwen2_vl/modeling_qwen2_vl.py``); with none in the sequence every token, image tokens
    included, is numbered as text, so the processor gives those ``position_ids`` and the HF forward uses them.
    """

    mrope = True
    image_text = "<|vision_start|><|image_pad|><|vision_end|>"
    image_token = "<|image_pad|>"
    vlm2vec_image_token = "<|image_pad|>"
    model_keys = (
        "input_ids",
        "attention_mask",
        "pixel_values",
        "image_grid_thw",
        "mm_token_type_ids",
        "position_ids",
        *QWEN_VIDEO_KEYS,
    )
    image_keys = ("image_grid_thw",)
    patch_grid_key = "image_grid_thw"
    video_text = "<|vision_start|><|video_pad|><|vision_end|>"
    video_token = "<|video_pad|>"
    video_keys = ("video_grid_thw", "second_per_grid_ts")
    video_grid_key = "video_grid_thw"
    example_args = [
        {"config": TINY_QWEN2VL_CONFIG, "processor": "tiny"},
        {"config": TINY_QWEN25VL_CONFIG, "processor": "tiny", "max_pixels": 28 * 28 * 8},
    ]

    def __init__(
        self,
        name: str | None = None,
        config: dict[str, Any] | None = None,
        pretrained: bool = True,
        processor: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        add_eos: bool = True,
        image_backend: str | None = None,
        video: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.check_config({"min_pixels": min_pixels, "max_pixels": max_pixels, "video": video})
        model, _, spec = load_native(
            "qwen2_vl", _CLASSES, name, config, pretrained, processor, ("tiny",), dtype, attn_implementation
        )
        proc = build_tiny_qwen2vl_processor() if spec == "tiny" else load_hf_processor(spec)
        self._setup_qwen(model, proc, spec, min_pixels, max_pixels, image_backend, add_eos, dtype, video)

    def _setup_qwen(
        self,
        model: Any,
        proc: Any,
        spec: str,
        min_pixels: int | None,
        max_pixels: int | None,
        image_backend: str | None,
        add_eos: bool,
        dtype: str,
        video: dict[str, Any] | None,
    ) -> None:
        """The image processor's pixel bounds and backend, then :meth:`_setup` and the video options."""
        size = dict(proc.image_processor.size)
        if min_pixels is not None:
            size["shortest_edge"] = int(min_pixels)
        if max_pixels is not None:
            size["longest_edge"] = int(max_pixels)
        self.check_config({"min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"]})
        proc.image_processor.size = type(proc.image_processor.size)(**size)
        set_image_backend(proc, image_backend)
        self._setup(model, proc, add_eos, dtype, source=str(spec))
        self._setup_video(video, self.video_defaults())

    def video_defaults(self) -> dict[str, int]:
        """Frames resized to multiples of patch * merge (one merge unit), counts multiples of the temporal patch."""
        vp = self.hf_processor.video_processor
        return {"factor": int(vp.patch_size) * int(vp.merge_size), "frame_multiple": int(vp.temporal_patch_size)}

    def tokens_per_frame(self) -> int:
        """Visual tokens per sampled frame: an image's bound over the temporal patch (2 frames per token)."""
        return max(1, self.tokens_per_image() // int(self.hf_processor.video_processor.temporal_patch_size))

    @staticmethod
    def check_config(args: dict[str, Any]) -> None:
        check_video_config(args)
        lo, hi = args.get("min_pixels"), args.get("max_pixels")
        for key, value in (("min_pixels", lo), ("max_pixels", hi)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(key, f"must be a positive integer (pixels), got {value!r}")
        if lo is not None and hi is not None and lo > hi:
            raise ConfigError("min_pixels", f"min_pixels={lo} is above max_pixels={hi}")

    @property
    def text_positions(self) -> bool:
        return self.layout == "vlm2vec"

    def tokens_per_image(self) -> int:
        """Upper bound of visual tokens per image: ``max_pixels / (patch * merge)^2``."""
        ip = self.hf_processor.image_processor
        unit = int(ip.patch_size) * int(ip.merge_size)
        return max(1, int(ip.size["longest_edge"]) // (unit * unit))

    def vision_tower(self) -> nn.Module:
        return self.base_model().visual

    def connector_in_dim(self) -> int:
        """A connector sees each 2x2 merge unit's patches concatenated (as Qwen's merger): m*m*D_v wide."""
        visual = self.base_model().visual
        width = visual.merger.ln_q.weight.shape[0]  # the ViT width (Qwen2-VL embed_dim, 2.5-VL hidden_size)
        return int(width) * int(visual.spatial_merge_size) ** 2

    def _install_connector(self, connector: nn.Module) -> bool:
        """The merger becomes a reshape to merge units; :meth:`image_features` applies ``connector`` per image on
        its (h/m, w/m) unit grid, so its tokens keep Qwen's budget when it keeps the count (``mlp``). The HF forward
        cannot call an mmembed connector, so mmembed always splices (True)."""
        if getattr(connector, "mode", None) == "exact":
            raise ConfigError(
                "model.connector.mode",
                "Qwen2-VL's grid varies per image (dynamic resolution); exact pooling needs a fixed grid: use "
                "mode: adaptive",
            )
        visual = self.base_model().visual
        visual.merger = _MergeUnits(int(visual.spatial_merge_size))
        return True

    def image_features(self, batch: dict[str, torch.Tensor], connector: nn.Module | None) -> list[torch.Tensor]:
        """Per image (N_k, d): the merger's output, or the connector's on the image's merge-unit grid."""
        base = self.base_model()
        grid = batch["image_grid_thw"]
        pixels = batch["pixel_values"].to(self.model_dtype())
        feats = list(base.get_image_features(pixels, grid, return_dict=True).pooler_output)
        conn = connector
        if conn is None:
            return feats
        m = int(base.visual.spatial_merge_size)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (t, h, w) in enumerate(grid.tolist()):
            if t != 1:
                raise InputError(f"image {i}: a connector swap takes single-frame images, got {t} frames")
            groups.setdefault((h // m, w // m), []).append(i)
        out: list[torch.Tensor] = [feats[0]] * len(feats)
        for g, idx in groups.items():  # one connector call per distinct grid
            y = conn(torch.stack([feats[i] for i in idx]).to(next(conn.parameters()).dtype), g)
            for j, i in enumerate(idx):
                out[i] = y[j]
        return out

    def image_items(self, batch: dict[str, torch.Tensor], connector: nn.Module | None) -> list[VisualItem]:
        """Tokens with M-RoPE (t, h, w) ids on their grid: the merge-unit grid, the connector's output grid
        (``out_grid``), or a line when the connector's tokens form no grid (``visual_table``'s indicators)."""
        m = int(self.base_model().visual.spatial_merge_size)
        items = []
        for f, (t, h, w) in zip(self.image_features(batch, connector), batch["image_grid_thw"].tolist()):
            if self.layout == "vlm2vec":  # numbered as text, as VLM2Vec's Qwen2-VL does (class docstring)
                items.append(VisualItem(f, line_positions(f.shape[0], f.device), f.shape[0]))
                continue
            g = (t, h // m, w // m)
            if connector is not None:
                out = connector.out_grid(g[1:])
                g = (1, *out) if out is not None and out[0] * out[1] == f.shape[0] else None
            if g is None:
                items.append(VisualItem(f, line_positions(f.shape[0], f.device), f.shape[0]))
            else:
                items.append(VisualItem(f, grid_positions(*g, device=f.device), max(g)))
        return items


class _MergeUnits(nn.Module):
    """Stands in for Qwen's merger under a connector swap: (N_patches, D_v) -> (N_patches/m^2, m^2*D_v) units
    (patches of a 2x2 unit are contiguous in Qwen's ViT order; Qwen2.5-VL's window order is undone by the tower)."""

    def __init__(self, merge_size: int) -> None:
        super().__init__()
        self.units = merge_size * merge_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, self.units * x.shape[-1])
