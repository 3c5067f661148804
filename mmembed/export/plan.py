"""What an export target can express of a saved mmembed model: the settings plain transformers cannot run.

A native VLM backbone (Qwen2-VL / Qwen2.5-VL, LLaVA / LLaVA-Next) whose visual path is stock (no connector in the
projector's place, no token merging or pruning) runs the transformers class's own forward, which is exactly what
``transformers`` and sentence-transformers' ``Transformer`` module run on the exported checkpoint. Everything mmembed
does around that forward must be expressible as a chat template (the row layout), a last-token or plain-mean
``Pooling``, an optional bias-free ``Dense`` (``model.embed_dim``) and ``Normalize``.

A text-only decoder model (``backbone.type: hf_causal_lm`` without ``model.vision``) runs the ``<Model>ForCausalLM``
base model's own forward on mmembed's token ids; it needs causal attention and last-token pooling
(:func:`text_blockers`, :mod:`mmembed.export.text`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ExportError", "native_blockers", "text_blockers", "NATIVE_CLASSES"]

#: mmembed backbone ``model_type`` -> the transformers class whose checkpoint layout the HF export writes
NATIVE_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
}

_COMPOSED = "use --to sentence-transformers (composed module: mmembed.export.st_module.MMEmbedModule)"


class ExportError(ValueError):
    """An export the target cannot express; the message names the setting and the way out."""


def native_blockers(model: Any) -> list[str]:
    """Why ``model`` cannot be written as a plain transformers checkpoint (+ sentence-transformers ``Transformer``
    files): one sentence per setting, naming it (empty: it can).

    Args:
        model: a loaded :class:`~mmembed.model.EmbeddingModel`.
    """
    from mmembed.backbones.hf_causal_lm import HFCausalLM
    from mmembed.backbones.native import NativeVLM

    cfg, backbone = model.cfg, model.backbone
    btype = cfg.backbone.get("type")
    if isinstance(backbone, HFCausalLM) and model.vision is None and model.visual is None:
        return text_blockers(model)
    if not isinstance(backbone, NativeVLM):
        return [
            f"backbone.type={btype} is a composed model (mmembed's own vision encoder, connector and splicing); "
            f"--to hf needs a native VLM backbone (qwen2_vl, llava) or a text-only hf_causal_lm model; {_COMPOSED}"
        ]
    out = []
    model_type = backbone.base_model().config.model_type
    if model_type not in NATIVE_CLASSES:
        out.append(f"backbone model_type={model_type} has no known transformers class; {_COMPOSED}")
    hf_name = NATIVE_CLASSES.get(model_type, model_type)
    if cfg.connector is not None:
        part = "merger" if model_type.startswith("qwen") else "multi_modal_projector"
        out.append(
            f"connector.type={cfg.connector.get('type')} replaces {hf_name}'s {part}; --to hf cannot express it; "
            f"{_COMPOSED}"
        )
    for slot in ("merge", "prune"):
        node = getattr(cfg, slot)
        if node is not None:
            out.append(
                f"{slot}.type={node.get('type')} reduces the visual tokens inside mmembed's forward, which "
                f"{hf_name} does not run; --to hf cannot express it; {_COMPOSED}"
            )
    if cfg.fusion is not None:
        out.append(f"fusion.type={cfg.fusion.get('type')} has no transformers equivalent; {_COMPOSED}")
    pooler = cfg.pooler or {}
    ptype = pooler.get("type")
    if ptype == "mean" and pooler.get("skip_instruction", True):
        out.append(
            "pooler.type=mean with skip_instruction=true leaves the instruction tokens out of the mean; "
            "sentence-transformers' Pooling cannot on chat-template inputs (include_prompt works on plain text "
            f"only); {_COMPOSED}"
        )
    elif ptype not in ("last_token", "mean"):
        out.append(f"pooler.type={ptype} is an mmembed module with weights, not a Pooling mode; {_COMPOSED}")
    if cfg.backbone.get("image_backend") == "pil":
        out.append(
            "backbone.image_backend=pil: the saved processor reloads with transformers' default (torchvision) image "
            "processor, whose resized pixels differ (mmembed.backbones.native.set_image_backend); --to hf cannot "
            f"pin it; {_COMPOSED}"
        )
    if getattr(backbone, "text_positions", False):
        out.append(
            f"layout={cfg.layout} numbers {hf_name}'s image tokens as text (1-D position_ids from mmembed's "
            f"processor), which its forward derives differently (M-RoPE); {_COMPOSED}"
        )
    return out


def text_blockers(model: Any) -> list[str]:
    """Why a text-only ``hf_causal_lm`` model cannot be a plain ``<Model>ForCausalLM`` checkpoint + ``Transformer``
    -> ``Pooling(lasttoken)`` files (empty: it can).

    Args:
        model: a loaded :class:`~mmembed.model.EmbeddingModel` whose backbone is ``HFCausalLM`` and has no vision.
    """
    from mmembed.export.text import causal_lm_class

    cfg, backbone = model.cfg, model.backbone
    out = []
    model_type = backbone.model.config.model_type
    cls_name = causal_lm_class(model_type)
    if cls_name is None:
        out.append(f"backbone model_type={model_type} has no transformers ForCausalLM class; {_COMPOSED}")
    hf_name = cls_name or model_type
    if getattr(backbone, "attention", "causal") != "causal":
        out.append(
            f"backbone.attention={backbone.attention}: {hf_name} runs causal attention in transformers, "
            f"sentence-transformers and vLLM; --to hf cannot express it; {_COMPOSED}"
        )
    for slot in ("connector", "merge", "prune", "fusion"):
        node = getattr(cfg, slot, None)
        if node is not None:
            out.append(f"{slot}.type={node.get('type')} has no transformers equivalent; {_COMPOSED}")
    ptype = (cfg.pooler or {}).get("type")
    if ptype != "last_token":
        why = (
            "mmembed's mean leaves out the BOS (and with skip_instruction the instruction), vLLM's MEAN pooling "
            "averages every token"
            if ptype == "mean"
            else "an mmembed module with weights, not a Pooling mode"
        )
        out.append(
            f"pooler.type={ptype}: --to hf exports text-only models with last_token pooling ({why}); {_COMPOSED}"
        )
    return out
