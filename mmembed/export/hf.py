"""``--to hf``: a native mmembed model as a transformers checkpoint plus sentence-transformers' files.

Written into one folder (the layout of hub embedding models such as GME or Qwen3-VL-Embedding):

```
config.json, model.safetensors    the <Model>ForConditionalGeneration config and the base model's weights in the
                                  hub key layout (LoRA/DoRA already merged when mmembed saved the model); no lm_head
processor_config.json, tokenizer* the HF processor (image processor with mmembed's pixel budget)
chat_template.jinja               mmembed's row layout as a chat template (mmembed.export.template)
modules.json                      Transformer -> 1_Pooling (lasttoken | mean) [-> 2_Dense] [-> Normalize]
sentence_bert_config.json         the Transformer module's settings: modality_config, processing_kwargs
config_sentence_transformers.json prompts, similarity_fn_name, truncate_dim
```
``transformers.AutoModel.from_pretrained(OUT)`` gives the base model (``Qwen2VLModel``...) with every weight;
``<Model>ForConditionalGeneration.from_pretrained(OUT)`` loads too and reports its ``lm_head`` as newly initialized
(an embedding model has none; tied ones are rebuilt from the embeddings). sentence-transformers' module formats:
https://sbert.net/docs/sentence_transformer/usage/custom_models.html ; checkpoint loading:
https://huggingface.co/docs/transformers/main_classes/model#transformers.PreTrainedModel.from_pretrained
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from mmembed.export.plan import NATIVE_CLASSES
from mmembed.export.template import mmembed_chat_template

__all__ = ["hub_state", "write_hf_checkpoint", "write_st_transformer", "write_st_config", "modality_config"]

# modules.json types by their full module path, as sentence-transformers 6.3's own save writes them; vLLM 0.32 reads
# the Pooling / Normalize / Dense modules only under these names (vllm/transformers_utils/config.py:
# _ST_POOLING_MODULE_TYPES, _ST_NORMALIZE_MODULE_TYPES, _DENSE_MODULE_TYPES), not under the package re-exports
_TRANSFORMER = "sentence_transformers.base.modules.transformer.Transformer"
_POOLING = "sentence_transformers.sentence_transformer.modules.pooling.Pooling"
_DENSE = "sentence_transformers.base.modules.dense.Dense"
_NORMALIZE = "sentence_transformers.base.modules.normalize.Normalize"


def _tensors(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """``module``'s state dict under ``prefix``, each tensor stored once (tied weights keep their first name)."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out = {}
    for name, t in module.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[prefix + name] = t.detach().contiguous().cpu()
    return out


def hub_state(base: torch.nn.Module, config: Any) -> dict[str, torch.Tensor]:
    """The base model's weights in the key layout ``<Model>ForConditionalGeneration.save_pretrained`` writes (the
    hub's: Qwen2-VL ``model.layers.*`` / ``visual.*``, LLaVA ``language_model.model.*`` / ``vision_tower.*``), which
    ``AutoModel`` and the ForConditionalGeneration class both load (and vLLM reads, as any hub checkpoint).

    transformers' own reverse key mapping (``core_model_loading.revert_weight_conversion``) is applied to a
    ForConditionalGeneration built on the meta device (no memory) around the ``model.``-prefixed state.
    """
    import transformers
    from transformers.core_model_loading import revert_weight_conversion

    cls = getattr(transformers, NATIVE_CLASSES[config.model_type])
    with torch.device("meta"):
        shell = cls._from_config(config)
    return revert_weight_conversion(shell, _tensors(base, "model."))


def write_hf_checkpoint(model: Any, out: Path) -> dict[str, Any]:
    """Write ``config.json``, ``model.safetensors``, the processor and its chat template into ``out``.

    Args:
        model: a loaded native :class:`~mmembed.model.EmbeddingModel` (checked by
            :func:`mmembed.export.plan.native_blockers`).
        out: the export folder (created).

    Returns:
        what the sentence-transformers files need: ``{"hidden_size": d, "chat_template": str}``.
    """
    from safetensors.torch import save_file

    backbone = model.backbone
    base = backbone.base_model()
    out.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(base.config)
    config.architectures = [NATIVE_CLASSES[config.model_type]]
    config.save_pretrained(out)
    save_file(hub_state(base, config), str(out / "model.safetensors"), metadata={"format": "pt"})

    proc = model.processor  # mmembed.processing.NativeProcessor
    template = mmembed_chat_template(
        placeholder=proc.placeholder,
        image_text=proc.image_text,
        lead_text=proc.lead_text,
        suffix=proc.suffix,
        join_always=proc.join_as_vlm2vec,
    )
    hf_proc = copy.deepcopy(backbone.hf_processor)
    original = getattr(hf_proc, "chat_template", None)
    if isinstance(original, str) and original:  # the checkpoint's own chat template stays, by name
        hf_proc.chat_template = {"default": template, "original": original}
    else:
        hf_proc.chat_template = template
    # not kept by the saved tokenizer in transformers 5: sentence_bert_config.json's processing_kwargs carries it
    hf_proc.tokenizer.padding_side = proc.padding_side
    hf_proc.save_pretrained(out)
    _check_processor_round_trip(hf_proc, out)
    return {"hidden_size": int(backbone.hidden_size), "chat_template": template}


def _check_processor_round_trip(saved: Any, out: Path) -> None:
    """``AutoProcessor.from_pretrained(out)`` must give the image processor class (PIL or torchvision backend, see
    :func:`mmembed.backbones.native.set_image_backend`) and settings mmembed used, or the pixels would differ.
    (The tokenizer's ``padding_side`` is not kept by transformers 5's save; the sentence-transformers config passes
    it with every call.)"""
    from transformers import AutoProcessor

    from mmembed.export.plan import ExportError

    back = AutoProcessor.from_pretrained(out)
    a, b = saved.image_processor, back.image_processor
    if type(a) is not type(b) or a.to_dict() != b.to_dict():
        raise ExportError(
            f"model.backbone.image_backend: the processor reloads with {type(b).__name__}, mmembed used "
            f"{type(a).__name__}; transformers cannot pin the image processor backend in the checkpoint"
        )


def modality_config() -> dict[str, dict[str, Any]]:
    """sentence-transformers' ``modality_config`` for a native VLM: every modality through ``forward`` and its
    ``last_hidden_state``; ``message`` (structured) makes every input go through the chat template
    (``Transformer.preprocess``: "Always convert to the message format if it's supported")."""
    entry = {"method": "forward", "method_output_name": "last_hidden_state"}
    return {
        "text": dict(entry),
        "image": dict(entry),
        "image+text": dict(entry),
        "message": {**entry, "format": "structured"},
    }


def _dump(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def write_st_transformer(model: Any, out: Path, hidden_size: int, text_only: bool = False) -> list[dict[str, Any]]:
    """``sentence_bert_config.json`` and the pooling / dense / normalize modules; returns ``modules.json``'s list.

    ``text_only`` (a text-only decoder, :mod:`mmembed.export.text`): the ``text`` modality alone (no chat template)
    and ``max_seq_length`` = ``model.max_length`` (the tokenizer truncates the text, keeping its BOS / EOS).

    Pooling is ``lasttoken`` (mmembed's ``last_token``, the last real token for left and right padding alike) or
    ``mean`` (mmembed's ``mean`` with ``skip_instruction: false``); ``model.embed_dim`` becomes a bias-free
    ``Dense`` with the identity activation (mmembed's ``proj``), ``normalize: true`` a ``Normalize``.
    """
    cfg = model.cfg
    modalities = {"text": modality_config()["text"]} if text_only else modality_config()
    st_cfg: dict[str, Any] = {
        "transformer_task": "feature-extraction",
        "modality_config": modalities,
        "module_output_name": "token_embeddings",
        # mmembed pads on cfg.padding_side; Qwen2-VL does not take unpadded (flattened) batches
        "processing_kwargs": {"text": {"padding_side": cfg.padding_side}},
        "unpad_inputs": False,
    }
    if text_only:
        st_cfg["max_seq_length"] = int(cfg.max_length)
    _dump(out / "sentence_bert_config.json", st_cfg)
    modules = [{"idx": 0, "name": "0", "path": "", "type": _TRANSFORMER}]
    mode = "lasttoken" if cfg.pooler["type"] == "last_token" else "mean"
    pool = {"embedding_dimension": hidden_size, "pooling_mode": mode, "include_prompt": True}
    _dump(out / "1_Pooling" / "config.json", pool)
    modules.append(
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": _POOLING,
        }
    )
    if model.proj is not None:
        from safetensors.torch import save_file

        dense = {
            "in_features": hidden_size,
            "out_features": int(model.proj.out_features),
            "bias": False,
            "activation_function": "torch.nn.modules.linear.Identity",
        }
        _dump(out / "2_Dense" / "config.json", dense)
        weight = model.proj.weight.detach().float().contiguous().cpu()
        save_file({"linear.weight": weight}, str(out / "2_Dense" / "model.safetensors"))
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": _DENSE})
    if cfg.normalize:
        i = len(modules)
        modules.append({"idx": i, "name": str(i), "path": f"{i}_Normalize", "type": _NORMALIZE})
        (out / f"{i}_Normalize").mkdir(parents=True, exist_ok=True)
    return modules


def write_st_config(out: Path, meta: dict[str, Any], modules: list[dict[str, Any]], extra: dict[str, Any]) -> None:
    """``modules.json`` and ``config_sentence_transformers.json`` (``prompts``, ``default_prompt_name`` none,
    ``similarity_fn_name`` from the saved ``similarity``, ``truncate_dim`` when saved, and ``extra`` keys such as
    ``requirements``)."""
    import importlib.metadata as md

    versions = {}
    for dist, key in (("sentence-transformers", "sentence_transformers"), ("transformers", "transformers")):
        try:
            versions[key] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    versions["pytorch"] = torch.__version__
    config = {
        "model_type": "SentenceTransformer",
        "__version__": versions,
        "prompts": dict(meta.get("prompts") or {}),
        "default_prompt_name": None,
        "similarity_fn_name": meta.get("similarity") or "cosine",
        **extra,
    }
    if meta.get("truncate_dim"):
        config["truncate_dim"] = int(meta["truncate_dim"])
    _dump(out / "config_sentence_transformers.json", config)
    _dump(out / "modules.json", modules)
