"""``--to hf`` for a text-only decoder model (``backbone.type: hf_causal_lm``, no ``model.vision``, last-token pooling).

The folder is a plain ``<Model>ForCausalLM`` checkpoint (Qwen2 / Qwen3 / Llama / Mistral ...) plus
sentence-transformers' ``Transformer`` -> ``Pooling(lasttoken)`` [-> ``Dense``] [-> ``Normalize``] files, the layout
of decoder embedding models on the hub (Qwen3-Embedding, gte-Qwen2), which transformers, sentence-transformers and
vLLM's pooling runner all read:

```
config.json, model.safetensors      <Model>ForCausalLM config; the base model's weights under ``model.`` (no lm_head)
tokenizer.json, tokenizer_config.json  mmembed's tokenizer; its post-processor appends mmembed's EOS (and BOS)
sentence_bert_config.json           text modality, max_seq_length = model.max_length, the padding side
config_sentence_transformers.json   the saved prompts as text prefixes ("<instruction> "), similarity, truncate_dim
```

mmembed's text row is ``prefix + tokens(instruction + " " + text) + EOS`` (``mmembed.processing.Processor``,
``BaseProcessor.layout``). The saved tokenizer reproduces it with ``add_special_tokens=True`` (transformers' default,
sentence-transformers' and vLLM's: ``tokenizer.encode(prompt)`` in vLLM's renderer) through a ``tokenizers``
``TemplateProcessing`` post-processor (https://huggingface.co/docs/tokenizers/api/post-processors), as Qwen3-Embedding's
tokenizer appends ``<|endoftext|>``. A prompt becomes ``instruction.strip() + " "``: sentence-transformers prepends
prompts by string concatenation (``InputFormatter.prepend_prompt_to_texts``: ``prompt + text``). Truncation agrees
too: transformers cuts the text to ``model_max_length`` minus the special tokens, from the end, as mmembed does.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from mmembed.export.plan import ExportError

__all__ = ["causal_lm_class", "write_text_checkpoint", "st_prompts", "PROBES"]

#: strings whose tokenization the saved tokenizer must reproduce exactly (checked on every export)
PROBES = (
    "a red circle on the left",
    "Represent the given input. what color is the object?",
    "  x  y ",
    "Instruct: Query: 0123456789 ünïcode — ok",
    "",
)


def causal_lm_class(model_type: str) -> str | None:
    """The transformers ``ForCausalLM`` class name of ``model_type`` (``qwen2`` -> ``Qwen2ForCausalLM``), if any."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    return name if isinstance(name, str) else None


def st_prompts(prompts: dict[str, str]) -> dict[str, str]:
    """mmembed's prompts as sentence-transformers text prefixes: ``instruction.strip() + " "`` (empty stays empty),
    so ``prompt + text`` is mmembed's ``instruction + " " + text``."""
    return {k: (v.strip() + " " if v and v.strip() else "") for k, v in prompts.items()}


def _hub_state(base: torch.nn.Module, cls_name: str) -> dict[str, torch.Tensor]:
    """The base model's weights in the ``<Model>ForCausalLM`` hub key layout (``model.layers.*``), through
    transformers' own ``revert_weight_conversion`` on a meta-device shell (as :func:`mmembed.export.hf.hub_state`)."""
    import transformers
    from transformers.core_model_loading import revert_weight_conversion

    from mmembed.export.hf import _tensors

    cls = getattr(transformers, cls_name)
    with torch.device("meta"):
        shell = cls._from_config(base.config)
    return revert_weight_conversion(shell, _tensors(base, cls.base_model_prefix + "."))


def _eos_tokenizer(tokenizer: Any, prefix: list[int], suffix: list[int]) -> Any:
    """A copy of ``tokenizer`` whose ``add_special_tokens=True`` output is ``prefix + ids + suffix``."""
    from tokenizers import processors

    tok = copy.deepcopy(tokenizer)
    ids = [*prefix, *suffix]
    names = tok.convert_ids_to_tokens(ids)
    specials = sorted({(n, i) for n, i in zip(names, ids)})
    pre = " ".join(f"{n}:0" for n in names[: len(prefix)])
    suf = " ".join(f"{n}:0" for n in names[len(prefix) :])
    single = f"{pre} $A:0 {suf}".strip()
    pair = f"{pre} $A:0 $B:1 {suf}".strip()
    # tokenizers classes with these flags (Llama, Qwen2 in transformers 5) rebuild their post-processor from them
    for flag, on in (("add_bos_token", bool(prefix)), ("add_eos_token", bool(suffix))):
        if hasattr(tok, flag):
            try:
                setattr(tok, flag, on)
            except (AttributeError, ValueError):
                pass
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=specials
    )
    return tok


def _check_tokenizer(src: Any, out: Path, prefix: list[int], suffix: list[int], max_length: int) -> None:
    """``AutoTokenizer.from_pretrained(out)`` must give mmembed's ids on :data:`PROBES` (with its BOS / EOS)."""
    from transformers import AutoTokenizer

    back = AutoTokenizer.from_pretrained(out)
    for text in PROBES:
        want = prefix + list(src(text, add_special_tokens=False)["input_ids"]) + suffix
        got = list(back(text)["input_ids"])
        if got != want:
            raise ExportError(
                f"backbone.tokenizer: the saved tokenizer ({type(back).__name__}) gives {got} for {text!r}, mmembed "
                f"gives {want}; transformers cannot reproduce mmembed's tokenization of this tokenizer"
            )
    if back.model_max_length != max_length:
        raise ExportError(f"model.max_length={max_length}: the saved tokenizer reloads with {back.model_max_length}")


def write_text_checkpoint(model: Any, out: Path) -> dict[str, Any]:
    """Write ``config.json``, ``model.safetensors`` and the tokenizer of a text-only ``hf_causal_lm`` model.

    Args:
        model: a loaded :class:`~mmembed.model.EmbeddingModel` that :func:`mmembed.export.plan.native_blockers`
            accepts (text-only, causal attention, last-token pooling).
        out: the export folder (created).

    Returns:
        ``{"hidden_size": d}`` for the sentence-transformers files.

    Raises:
        ExportError: the saved tokenizer does not reproduce mmembed's token ids (names ``backbone.tokenizer``).
    """
    from safetensors.torch import save_file

    backbone, proc = model.backbone, model.processor
    base = backbone.model
    cls_name = causal_lm_class(base.config.model_type)
    assert cls_name is not None  # checked by native_blockers
    out.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(base.config)
    config.architectures = [cls_name]
    config.save_pretrained(out)
    save_file(_hub_state(base, cls_name), str(out / "model.safetensors"), metadata={"format": "pt"})

    prefix, suffix = list(proc.prefix_ids), list(proc.suffix_ids)
    tok = _eos_tokenizer(backbone.tokenizer, prefix, suffix)
    tok.model_max_length = int(model.cfg.max_length)
    tok.padding_side = model.cfg.padding_side
    tok.save_pretrained(out)
    _check_tokenizer(backbone.tokenizer, out, prefix, suffix, int(model.cfg.max_length))
    return {"hidden_size": int(backbone.hidden_size)}
