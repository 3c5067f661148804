"""Any transformers decoder LM (Qwen2/2.5/3, Llama, Phi-3, Mistral, Gemma) as an embedding backbone.

The base model (``AutoModel``, no LM head) reads ``inputs_embeds`` with the visual rows spliced in and explicit
``position_ids`` (left-padding safe, docs/algorithms.md §6.3 and §8), SDPA attention.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmembed.backbones.base import Backbone, hidden_of
from mmembed.registry import BACKBONES
from mmembed.tiny import build_tiny_tokenizer
from mmembed.types import ConfigError

__all__ = ["HFCausalLM", "load_tokenizer"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(spec: str, trust_remote_code: bool = False) -> Any:
    """``tiny`` builds the offline test tokenizer; anything else goes to ``AutoTokenizer.from_pretrained``."""
    if spec == "tiny":
        return build_tiny_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)


@BACKBONES.register("hf_causal_lm")
class HFCausalLM(Backbone):
    """A transformers causal LM used as an encoder.

    Args:
        name: hub id or local directory; weights load from it when ``pretrained``.
        config: a config dict with ``model_type`` for random init without any download (tiny recipes); wins
            over ``name`` for the architecture.
        pretrained: load weights from ``name``.
        tokenizer: hub id, local directory, or ``tiny``; defaults to ``name``.
        dtype: ``float32`` (CPU default) or ``bfloat16`` / ``float16`` for GPUs.
        attn_implementation: ``sdpa`` (default), ``eager`` or ``flash_attention_2``.
        add_eos: append the tokenizer's EOS so last-token pooling reads it (docs/algorithms.md §6.3).
        trust_remote_code: passed to transformers; off unless the user turns it on.
        attention: ``causal`` (default) or ``bidirectional``: every attention module gets ``is_causal = False``
            and a padding-only 4-D mask (``masking_utils.create_bidirectional_mask``), which the SDPA, eager and
            flash paths all honour (LLM2Vec / NV-Embed, docs/algorithms.md §6.5). Needs contrastive fine-tuning.
    """

    example_args = [
        {
            "tokenizer": "tiny",
            "config": {
                "model_type": m,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": 512,
                "max_position_embeddings": 256,
            },
        }
        for m in ("qwen2", "llama")
    ]

    def __init__(
        self,
        name: str | None = None,
        config: dict[str, Any] | None = None,
        pretrained: bool = True,
        tokenizer: str | None = None,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        add_eos: bool = True,
        trust_remote_code: bool = False,
        attention: str = "causal",
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        torch_dtype = _DTYPES[dtype]
        if config is not None:
            cfg_dict = dict(config)
            model_type = cfg_dict.pop("model_type", None)
            if model_type is None:
                raise ValueError("backbone.config needs 'model_type' (e.g. qwen2, llama)")
            hf_cfg = AutoConfig.for_model(model_type, **cfg_dict)
            self.model = AutoModel.from_config(hf_cfg, attn_implementation=attn_implementation, dtype=torch_dtype)
        elif name:
            if pretrained:
                self.model = AutoModel.from_pretrained(
                    name,
                    dtype=torch_dtype,
                    attn_implementation=attn_implementation,
                    trust_remote_code=trust_remote_code,
                )
            else:
                hf_cfg = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
                self.model = AutoModel.from_config(
                    hf_cfg,
                    attn_implementation=attn_implementation,
                    dtype=torch_dtype,
                    trust_remote_code=trust_remote_code,
                )
        else:
            raise ValueError("hf_causal_lm needs 'name' (hub id or directory) or 'config'")
        tok_spec = tokenizer or name
        if tok_spec is None:
            raise ValueError("hf_causal_lm built from 'config' needs 'tokenizer' (a directory, hub id or 'tiny')")
        self.tokenizer = load_tokenizer(tok_spec, trust_remote_code)
        if self.tokenizer.pad_token_id is None:  # Llama-style tokenizers: pad with EOS (never located by id)
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        text_cfg = self.model.config.get_text_config()
        self.hidden_size = int(text_cfg.hidden_size)
        self.num_layers = int(text_cfg.num_hidden_layers)
        self.add_eos = add_eos and self.tokenizer.eos_token_id is not None
        self._dtype_name = dtype
        self.check_config({"attention": attention})
        self.attention = attention
        self.causal = attention == "causal"
        if attention == "bidirectional":
            for module in self.model.modules():
                if hasattr(module, "is_causal"):
                    module.is_causal = False

    @staticmethod
    def check_config(args: dict[str, Any]) -> None:
        if args.get("attention", "causal") not in ("causal", "bidirectional"):
            raise ConfigError("attention", f"got {args.get('attention')!r}; allowed: causal, bidirectional")

    def _mask(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.attention == "causal":
            return attention_mask
        from transformers.masking_utils import create_bidirectional_mask

        mask = create_bidirectional_mask(
            config=self.model.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            allow_is_bidirectional_skip=False,
        )
        return attention_mask if mask is None else mask  # flash-attention keeps the 2-D mask

    def language_forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        all_layers: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        out = self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=self._mask(inputs_embeds, attention_mask),
            position_ids=position_ids,
            output_hidden_states=all_layers,
            use_cache=False,
        )
        return hidden_of(out, all_layers)

    def add_image_token(self, token: str) -> int:
        """The image placeholder the processor expands: added to the tokenizer, written per visual token."""
        self.image_token_id = self.add_placeholder(token)
        return self.image_token_id

    def add_placeholder(self, token: str) -> int:
        if token not in self.tokenizer.get_vocab():
            self.tokenizer.add_tokens([token], special_tokens=True)
        token_id = int(self.tokenizer.convert_tokens_to_ids(token))
        emb = self.model.get_input_embeddings()
        if token_id >= emb.num_embeddings:
            self.model.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        return token_id

    def export(self, directory: Path) -> dict[str, Any]:
        return self._export_hf(directory, {"tokenizer": self.tokenizer})
