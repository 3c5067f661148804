"""Qwen3-VL as a native embedding backbone (Qwen3-VL-Embedding), through the transformers classes.

The HF base model (``Qwen3VLModel``, transformers ``models/qwen3_vl/modeling_qwen3_vl.py``; Qwen3-VL technical
report, arXiv 2511.21631) is Qwen2-VL's layout (ViT with a 2x2 patch merger, dynamic resolution, one visual token
per 32x32 pixels with 16 px patches) with two changes this module has to follow when mmembed splices the sequence:

- **DeepStack** (Meng et al., arXiv 2406.04334): the ViT layers ``vision_config.deepstack_visual_indexes`` each have
  their own merger; feature ``l`` (one row per visual token) is added to the hidden state at the visual token
  positions after LLM layer ``l`` (``Qwen3VLTextModel.forward`` / ``_deepstack_process``). So every visual token
  carries ``k`` extra rows, and whatever reduces the visual tokens must reduce them the same way: a swapped
  connector must keep one token per merge unit, AIM merging averages them with the same assignments as the tokens
  (:func:`merge_deepstack`), AIM pruning (``exact``) keeps the rows in place; ``fast`` pruning removes rows, which
  is refused while DeepStack layers follow.
- **interleaved M-RoPE**: the (t, h, w) frequencies alternate over the head dimension (``mrope_section``), inside
  the model's rotary embedding; the position ids themselves are Qwen2-VL's (``get_rope_index``: an image takes
  ``offset + (t, h, w)``, the next text ``offset + max(h, w)``), so :mod:`mmembed.backbones.splice` numbers them.
Videos: Qwen2-VL's HF video path (:mod:`mmembed.backbones.video`), with Qwen3-VL's ``<t seconds>`` frame texts.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmembed.backbones.base import hidden_of
from mmembed.backbones.native import (
    TINY_TEXT_CONFIG,
    NativeVisual,
    load_hf_processor,
    load_native,
)
from mmembed.backbones.qwen2_vl import QWEN_SPECIAL_TOKENS, Qwen2VL
from mmembed.backbones.video import QWEN_VIDEO_KEYS, check_stock
from mmembed.registry import BACKBONES
from mmembed.tiny import build_tiny_tokenizer
from mmembed.tokens.merge import AIMMerger, merged_count
from mmembed.tokens.prune import pruned_forward
from mmembed.types import ConfigError, InputError
from mmembed.visual import VisualItem, grid_positions, has_pixels, line_positions

__all__ = ["Qwen3VL", "DeepStackItem", "merge_deepstack", "build_tiny_qwen3vl_processor", "TINY_QWEN3VL_CONFIG"]

_CLASSES = {"qwen3_vl": "Qwen3VLForConditionalGeneration"}

#: A tiny random-init Qwen3-VL: 3-layer ViT (16 px patches) with DeepStack mergers on ViT layers 0 and 1 (added after
#: LLM layers 0 and 1), 2-layer 64-wide Qwen3 LLM with head_dim 32; ``mrope_section`` [6, 5, 5] sums to head_dim / 2
#: and splits the 16 frequencies as Qwen3-VL's [24, 20, 20] splits 64 (t keeps the rest after the interleaved h, w).
TINY_QWEN3VL_CONFIG: dict[str, Any] = {
    "model_type": "qwen3_vl",
    "image_token_id": 400,
    "vision_start_token_id": 401,
    "vision_end_token_id": 402,
    "video_token_id": 403,
    "text_config": {
        **TINY_TEXT_CONFIG,
        "head_dim": 32,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [6, 5, 5],
            "mrope_interleaved": True,
        },
    },
    "vision_config": {
        "depth": 3,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": 64,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0, 1],
    },
}


def build_tiny_qwen3vl_processor(
    patch_size: int = 16,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    min_tokens: int = 4,
    max_tokens: int = 16,
) -> Any:
    """An offline ``Qwen3VLProcessor``: mmembed's tiny tokenizer + the 4 Qwen vision tokens (ids 400-403), the
    Qwen2-VL image processor Qwen3-VL checkpoints use (mean = std = 0.5), ``min_tokens``..``max_tokens`` visual
    tokens per image."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    tok = build_tiny_tokenizer()
    tok.add_tokens(QWEN_SPECIAL_TOKENS, special_tokens=True)
    unit = (patch_size * merge_size) ** 2
    sizes = {"patch_size": patch_size, "merge_size": merge_size, "temporal_patch_size": temporal_patch_size}
    norm = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    image = Qwen2VLImageProcessor(**sizes, **norm, min_pixels=unit * min_tokens, max_pixels=unit * max_tokens)
    video = Qwen3VLVideoProcessor(**sizes, **norm, size={"shortest_edge": unit * min_tokens, "longest_edge": unit * 64})
    return Qwen3VLProcessor(image_processor=image, tokenizer=tok, video_processor=video)


@dataclass
class DeepStackItem(VisualItem):
    """A :class:`~mmembed.visual.VisualItem` with its DeepStack rows ``deep`` (k, N, d): row l is added to the
    hidden state of each of the N tokens after LLM layer l."""

    deep: torch.Tensor | None = None


def merge_deepstack(item: DeepStackItem, merger: AIMMerger) -> DeepStackItem:
    """AIM merging of ``item``'s tokens (:func:`mmembed.tokens.merge.merge_tokens`: same steps, same similarity on
    the tokens), its DeepStack rows merged with the *same* assignments: a survivor carries the (nested) mean of the
    rows of the tokens merged into it, as its token is the mean of theirs."""
    if not isinstance(merger, AIMMerger):
        raise ConfigError("model.merge", f"qwen3_vl merges its DeepStack features with AIM only, got {merger!r}")
    x = item.tokens[None]  # (1, N, d)
    k, n, d = item.deep.shape
    payload = item.deep.permute(1, 0, 2).reshape(1, n, k * d).to(x.dtype)
    pos = torch.arange(n, device=x.device)[None]
    target = merged_count(n, merger.keep_ratio)
    while x.shape[1] > target:
        x, payload, pos = _merge_step(x, payload, pos, min(x.shape[1] - target, x.shape[1] // 2))
    kept = item.select(pos[0], x[0])
    deep = payload[0].reshape(-1, k, d).permute(1, 0, 2)
    return DeepStackItem(**{f.name: getattr(kept, f.name) for f in fields(VisualItem)}, deep=deep)


def _merge_step(
    x: torch.Tensor, payload: torch.Tensor, pos: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`mmembed.tokens.merge.merge_step` on x (n, t, c) (the matching from x alone), applied to the columns
    of ``[x | payload]``: the x part is that function's output (every reduction is per column)."""
    c = x.shape[-1]
    r = min(r, x.shape[1] // 2)
    if r <= 0:
        return x, payload, pos
    metric = F.normalize(x.float(), dim=-1)
    a, b = metric[:, 0::2], metric[:, 1::2]
    best, dst_idx = (a @ b.transpose(1, 2)).max(dim=-1)
    order = best.argsort(dim=-1, descending=True, stable=True)
    src, unm = order[:, :r], order[:, r:]
    y = torch.cat([x, payload], dim=-1)
    w = y.shape[-1]
    ya, yb = y[:, 0::2], y[:, 1::2]
    pa, pb = pos[:, 0::2], pos[:, 1::2]
    dst = dst_idx.gather(1, src)
    src_y = ya.gather(1, src[..., None].expand(-1, -1, w))
    yb = yb.scatter_reduce(1, dst[..., None].expand(-1, -1, w), src_y, reduce="mean", include_self=True)
    out_y = torch.cat([ya.gather(1, unm[..., None].expand(-1, -1, w)), yb], dim=1)
    out_p = torch.cat([pa.gather(1, unm), pb], dim=1)
    keep = out_p.argsort(dim=1)
    out_y = out_y.gather(1, keep[..., None].expand(-1, -1, w))
    return out_y[..., :c], out_y[..., c:], out_p.gather(1, keep)


@BACKBONES.register("qwen3_vl")
class Qwen3VL(Qwen2VL):
    """Qwen3-VL with its own ViT, mergers (main + DeepStack) and processor; Qwen2-VL's arguments and behaviour.

    Args:
        name: hub id or local directory (HF format); weights, processor and tokenizer load from it. When set,
            ``config`` and a ``tiny`` processor are ignored (``model.backbone.name=...`` on a tiny recipe).
        config: a config dict with ``model_type: qwen3_vl`` for random init (tiny recipes).
        pretrained: load weights from ``name``.
        processor: processor directory / hub id, or ``tiny`` (offline test processor); defaults to ``name``.
        min_pixels, max_pixels: dynamic-resolution bounds per image (32x32 pixels per visual token).
        dtype: ``float32`` / ``bfloat16`` / ``float16``.
        attn_implementation: ``sdpa`` (default), ``eager`` or ``flash_attention_2``.
        add_eos: append the tokenizer's EOS (last-token pooling reads it).
        image_backend: ``pil`` | ``torchvision``: the image processor's backend (``None``: the processor's own).
        video: video options (docs/video.md), as Qwen2-VL's (``factor`` defaults to 16 * 2 = 32).

    Only ``model.layout: mmembed`` (VLM2Vec has no Qwen3-VL backbone to mirror). ``model.connector`` (one token
    per 2x2 merge unit, e.g. ``mlp``), ``model.merge: {type: aim}`` and ``model.prune: {type: aim}`` carry the
    DeepStack features along (module doc); the stock path is the HF forward.
    """

    layouts = ("mmembed",)
    model_keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    model_keys += QWEN_VIDEO_KEYS
    example_args = [{"config": TINY_QWEN3VL_CONFIG, "processor": "tiny"}]

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
        nn.Module.__init__(self)
        self.check_config({"min_pixels": min_pixels, "max_pixels": max_pixels, "video": video})
        model, _, spec = load_native(
            "qwen3_vl", _CLASSES, name, config, pretrained, processor, ("tiny",), dtype, attn_implementation
        )
        if spec == "tiny":
            vc = model.config.vision_config
            proc = build_tiny_qwen3vl_processor(
                int(vc.patch_size), int(vc.spatial_merge_size), int(vc.temporal_patch_size)
            )
        else:
            proc = load_hf_processor(spec)
        self._setup_qwen(model, proc, spec, min_pixels, max_pixels, image_backend, add_eos, dtype, video)

    @property
    def deepstack_layers(self) -> int:
        """k: the LLM layers (0..k-1) that add a DeepStack feature."""
        return len(self.base_model().config.vision_config.deepstack_visual_indexes)

    # ------------------------------------------------------------------------------------------
    # what the builder asks

    def visual_path(
        self, vision: nn.Module | None, connector: nn.Module | None, merger: nn.Module | None, pruner: Any
    ) -> NativeVisual:
        """Qwen2-VL's path whose items carry their DeepStack rows (:class:`_DeepStackVisual`)."""
        if merger is not None and not isinstance(merger, AIMMerger):
            raise ConfigError("model.merge", f"qwen3_vl merges its DeepStack features with AIM only, got {merger!r}")
        k = self.deepstack_layers
        if pruner is not None and getattr(pruner, "mode", "exact") == "fast":
            early = [i for i, r in enumerate(pruner.keep_ratios[: max(k - 1, 0)]) if r < 1.0]
            if early:
                raise ConfigError(
                    "model.prune.mode",
                    f"fast pruning removes rows after layer {early[0]}, but qwen3_vl adds DeepStack features to the "
                    f"visual rows after LLM layers 0..{k - 1}: use mode: exact, or a schedule keeping 1.0 through "
                    f"layer {k - 2}",
                )
        path = super().visual_path(vision, connector, merger, pruner)
        return _DeepStackVisual(self, path.connector, path.merger, path.stock)

    def connector_in_dim(self) -> int:
        """A connector sees each 2x2 merge unit's patches concatenated (as Qwen's merger): m*m*D_v wide."""
        vc = self.base_model().config.vision_config
        return int(vc.hidden_size) * int(vc.spatial_merge_size) ** 2

    def _install_connector(self, connector: nn.Module) -> bool:
        """Qwen2-VL's swap (the merger becomes a reshape to merge units), for connectors that keep one token per
        merge unit: the DeepStack features are per merge unit and cannot follow a pooled or re-tokenized grid."""
        if getattr(connector, "mode", None) != "exact":
            changed = [g for g in ((12, 20), (16, 16)) if connector.num_tokens(g) != g[0] * g[1]]
            if changed:
                g = changed[0]
                raise ConfigError(
                    "model.connector",
                    f"qwen3_vl adds DeepStack features per merge unit, so the connector must keep the token count "
                    f"(e.g. mlp); this one gives {connector.num_tokens(g)} tokens for a {g[0]}x{g[1]} grid",
                )
        return super()._install_connector(connector)

    # ------------------------------------------------------------------------------------------
    # visual tokens and forward

    def visual_features(
        self, batch: dict[str, torch.Tensor], connector: nn.Module | None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per image, in batch order: (N_k, d) visual tokens (the merger's, or the connector's on the image's
        merge-unit grid) and (k, N_k, d) DeepStack features (``Qwen3VLModel.get_image_features``)."""
        base = self.base_model()
        grid = batch["image_grid_thw"]
        out = base.get_image_features(batch["pixel_values"].to(self.model_dtype()), grid, return_dict=True)
        feats = list(out.pooler_output)
        layers = list(out.deepstack_features or [])
        deep = [
            torch.stack([layer[i] for layer in layers]) if layers else f.new_zeros(0, *f.shape)
            for i, f in enumerate(feats)
        ]
        if connector is None:
            return feats, deep
        m = int(base.visual.spatial_merge_size)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (t, h, w) in enumerate(grid.tolist()):
            if t != 1:
                raise InputError(f"image {i}: a connector swap takes single-frame images, got {t} frames")
            groups.setdefault((h // m, w // m), []).append(i)
        for g, idx in groups.items():  # one connector call per distinct grid
            y = connector(torch.stack([feats[i] for i in idx]).to(next(connector.parameters()).dtype), g)
            if y.shape[1] != g[0] * g[1]:
                raise InputError(f"the connector gave {y.shape[1]} tokens for a {g[0]}x{g[1]} grid (DeepStack)")
            for j, i in enumerate(idx):
                feats[i] = y[j]
        return feats, deep

    def image_features(self, batch: dict[str, torch.Tensor], connector: nn.Module | None) -> list[torch.Tensor]:
        return self.visual_features(batch, connector)[0]

    def blank_features(self, batch: dict[str, torch.Tensor], connector: nn.Module | None) -> list[torch.Tensor]:
        """The tokens and the DeepStack features (their mergers run on every image batch too)."""
        feats, deep = self.visual_features(batch, connector)
        return [*feats, *deep]

    def image_items(self, batch: dict[str, torch.Tensor], connector: nn.Module | None) -> list[VisualItem]:
        """Tokens with M-RoPE (t, h, w) ids on their merge-unit grid (or the connector's ``out_grid``), and their
        DeepStack rows."""
        m = int(self.base_model().visual.spatial_merge_size)
        feats, deep = self.visual_features(batch, connector)
        items: list[VisualItem] = []
        for f, ds, (t, h, w) in zip(feats, deep, batch["image_grid_thw"].tolist()):
            g: tuple[int, ...] | None = (t, h // m, w // m)
            if connector is not None:
                out = connector.out_grid(g[1:])
                g = (1, *out) if out is not None and out[0] * out[1] == f.shape[0] else None
            if g is None:
                pos, span = line_positions(f.shape[0], f.device), f.shape[0]
            else:
                pos, span = grid_positions(*g, device=f.device), max(g)
            items.append(DeepStackItem(f, pos, span, deep=ds))
        return items

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        visual: list[VisualItem] | None = None,
        pruner: Any = None,
        all_layers: bool = False,
    ) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
        """``None``: the HF forward. Visual rows: spliced by mmembed, then the LLM with the items' DeepStack rows
        at the spliced visual positions (``visual_pos_masks``), layer by layer under a pruner. With ``all_layers``
        the HF forward records each layer's output before its DeepStack addition, the pruned run after it."""
        if visual is None:
            return super().forward(batch, None, pruner, all_layers)
        missing = [i for i, it in enumerate(visual) if getattr(it, "deep", None) is None]
        if missing:
            raise InputError(f"visual items {missing} have no DeepStack features (qwen3_vl needs its own path)")
        sp = self.splice(batch, visual)
        dtype = sp.embeds.dtype
        deep = [torch.cat([it.deep[i] for it in visual]).to(dtype) for i in range(self.deepstack_layers)]
        lm = self.language_model()
        if pruner is not None and bool(sp.visual.any()):
            args = (sp.embeds, sp.attention_mask, sp.position_ids, sp.visual, pruner)
            hidden, kept = pruned_forward(_DeepStackLM(lm, sp.visual, deep), *args, self.causal, all_layers)
            return hidden, sp.attention_mask * kept, sp.pool_mask * kept
        out = lm(
            inputs_embeds=sp.embeds,
            attention_mask=sp.attention_mask,
            position_ids=sp.position_ids,
            visual_pos_masks=sp.visual,
            deepstack_visual_embeds=deep,
            output_hidden_states=all_layers,
            use_cache=False,
        )
        return hidden_of(out, all_layers), sp.attention_mask, sp.pool_mask


class _DeepStackVisual(NativeVisual):
    """Qwen3-VL's visual path: :class:`DeepStackItem` rows; a merger merges their DeepStack rows alongside."""

    def __call__(self, batch: dict[str, torch.Tensor]) -> list[VisualItem] | None:
        check_stock(batch, self.stock)
        if self.stock or not has_pixels(batch):
            return None
        items = self.backbone.image_items(batch, self.connector)
        return [merge_deepstack(it, self.merger) for it in items] if self.merger is not None else items


class _DeepStackLM:
    """``Qwen3VLTextModel`` as :func:`~mmembed.tokens.prune.pruned_forward` runs it: layer l < k adds DeepStack
    feature l at the visual rows right after its output (``Qwen3VLTextModel.forward``), with the model's own
    ``_deepstack_process``. ``exact`` pruning keeps every row in place, so the (B, L) ``visual`` mask stays valid;
    pruned rows get their feature too (their outputs are discarded). Everything else is the model's."""

    def __init__(self, lm: nn.Module, visual: torch.Tensor, deep: list[torch.Tensor]) -> None:
        self.lm = lm
        self.layers = [
            _DeepStackLayer(layer, lm, visual, deep[i] if i < len(deep) else None) for i, layer in enumerate(lm.layers)
        ]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.lm, name)


class _DeepStackLayer:
    """One decoder layer followed by its DeepStack addition (``feats`` (N_vis, d) at ``visual`` (B, L))."""

    def __init__(self, layer: nn.Module, lm: nn.Module, visual: torch.Tensor, feats: torch.Tensor | None) -> None:
        self.layer, self.lm, self.visual, self.feats = layer, lm, visual, feats

    def __getattr__(self, name: str) -> Any:
        return getattr(self.layer, name)

    def __call__(self, hidden: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        out = self.layer(hidden, **kwargs)
        if self.feats is None:
            return out
        if out.shape[:2] != self.visual.shape:
            raise InputError("rows were removed before a DeepStack layer (qwen3_vl needs model.prune.mode: exact)")
        return self.lm._deepstack_process(out, self.visual, self.feats)
