"""Architectures of the hub checkpoints the ``recipes/vlm2vec`` recipes name, for random-init benchmarks offline.

Copied from each checkpoint's HF ``config.json`` (sizes only); the special-token ids are those of the offline tiny
processor (``processor: tiny``), so ``--random-init`` builds the real architecture without a download.
"""

from __future__ import annotations

import json

_QWEN2VL_VISION = {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4, "patch_size": 14}
_QWEN_IDS = {"image_token_id": 400, "vision_start_token_id": 401, "vision_end_token_id": 402, "video_token_id": 403}


def _qwen2vl(hidden: int, inter: int, heads: int, kv: int) -> dict:
    text = {
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": 28,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    }
    vision = {**_QWEN2VL_VISION, "hidden_size": hidden, "spatial_merge_size": 2, "temporal_patch_size": 2}
    tied = {"tie_word_embeddings": hidden < 2048}  # the 2B ties its LM head (no effect on the base model used here)
    return {"model_type": "qwen2_vl", **_QWEN_IDS, **tied, "text_config": text, "vision_config": vision}


#: architectures of the hub checkpoints the vlm2vec recipes name (their HF config.json), for --random-init;
#: special-token ids are those of the offline tiny processor.
RANDOM_INIT = {
    "Qwen/Qwen2-VL-2B-Instruct": _qwen2vl(1536, 8960, 12, 2),
    "Qwen/Qwen2-VL-7B-Instruct": _qwen2vl(3584, 18944, 28, 4),
    "llava-hf/llava-v1.6-mistral-7b-hf": {
        "model_type": "llava_next",
        "image_token_id": 400,
        "vision_feature_select_strategy": "default",
        "vision_feature_layer": -2,
        "image_seq_length": 576,
        "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": 336,
            "patch_size": 14,
            "projection_dim": 768,
        },
        "text_config": {
            "model_type": "mistral",
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 32064,
            "max_position_embeddings": 32768,
        },
    },
}


def native_overrides(recipe: str, random_init: bool, dtype: str | None) -> list[str]:
    """Overrides for a native VLM recipe: the built-in architecture and the offline processor (no download)."""
    from mmembed.config import load_recipe

    out = [f"model.backbone.dtype={dtype}"] if dtype else []
    if random_init:
        name = load_recipe(recipe).model.backbone.get("name")
        if name not in RANDOM_INIT:
            raise SystemExit(f"--random-init knows {', '.join(RANDOM_INIT)}; the recipe names {name!r}")
        out += ["model.backbone.name=null", f"model.backbone.config={json.dumps(RANDOM_INIT[name])}"]
        out += ["model.backbone.processor=tiny"]
    return out
