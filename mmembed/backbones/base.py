"""The backbone contract."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["Backbone"]


class Backbone(nn.Module):
    """A decoder that reads ``inputs_embeds`` and returns hidden states.

    Attributes: ``tokenizer`` (with the image placeholder added by :meth:`add_placeholder`),
    ``hidden_size`` (d), ``num_layers``, ``add_eos``.
    """

    tokenizer: Any
    hidden_size: int
    num_layers: int
    add_eos: bool = True

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, d) token embeddings of the wrapped HF model."""
        return self.model.get_input_embeddings()(input_ids)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        all_layers: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """(B, L, d) -> last hidden state (B, L, d), or a tuple of every layer's (B, L, d) output."""
        raise NotImplementedError

    def forward_pruned(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        visual_mask: torch.Tensor,
        reducer: Any,
        all_layers: bool = False,
    ) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor]:
        """Forward with in-LLM visual-token pruning (``reducer.in_llm``): hidden (B, L, d) and kept mask (B, L)."""
        raise NotImplementedError(f"{type(self).__name__} does not support in-LLM token pruning")

    def add_placeholder(self, token: str) -> int:
        """Add ``token`` to the tokenizer as a special token (resizing embeddings if needed); return its id."""
        raise NotImplementedError

    def gradient_checkpointing_enable(self) -> None:
        """Activation checkpointing of the wrapped HF model (``self.model``), non-reentrant."""
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def export(self, directory: Path) -> dict[str, Any]:
        """Write what rebuilding needs into ``directory``; return the args that rebuild from it offline."""
        raise NotImplementedError

    def _export_hf(self, directory: Path, files: dict[str, Any]) -> dict[str, Any]:
        """Save the HF config to ``backbone/`` and each ``{arg: object with save_pretrained}`` to ``<arg>/``;
        return the init args pointing at those folders (weights come from model.safetensors)."""
        directory = Path(directory)
        self.model.config.save_pretrained(directory / "backbone")
        for arg, obj in files.items():
            obj.save_pretrained(directory / arg)
        args = dict(getattr(self, "init_args", {}))
        args.pop("config", None)
        args.update(name="backbone", pretrained=False, **{arg: arg for arg in files})
        return args


def hidden_of(out: Any, all_layers: bool) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """An HF model output -> last hidden state (B, L, d), or every layer's output (the embedding layer dropped)."""
    return tuple(out.hidden_states[1:]) if all_layers else out.last_hidden_state
