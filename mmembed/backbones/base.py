"""The backbone contract: a processor batch and its visual rows in, hidden states and their masks out.

``backbone(batch, visual, pruner=None, all_layers=False) -> (hidden, attention_mask, pool_mask)``:

- ``visual``: the visual path's rows (:class:`~mmembed.visual.VisualItem` per image) or ``None`` (nothing to
  splice: a text-only batch, or a native VLM's stock vision path inside its own forward);
- ``pruner``: an in-LLM :class:`~mmembed.tokens.Pruner`; every backbone reaches it through :meth:`Backbone.decode`,
  i.e. :func:`~mmembed.tokens.pruned_forward`;
- ``hidden``: the last hidden state (B, L', d) or every layer's (a tuple); the masks (B, L') align with it (pruned
  tokens are 0 in both).

The default :meth:`forward` splices the rows into the token embeddings and numbers the positions
(:func:`~mmembed.backbones.splice.splice_visual`), then decodes. A backbone says which slots it takes
(:meth:`check_slots`, before anything is built), gives the visual path (:meth:`visual_path`) and names the processor
family that lays out its batches (``processor``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmembed.backbones.splice import Spliced, splice_visual
from mmembed.tokens.prune import pruned_forward
from mmembed.types import ConfigError
from mmembed.visual import ComposedVisual, VisualItem, VisualPath

__all__ = ["Backbone", "hidden_of"]


class Backbone(nn.Module):
    """A decoder that reads the token embeddings with the visual rows spliced in.

    Attributes: ``tokenizer`` (with the image placeholder added by :meth:`add_placeholder`), ``hidden_size`` (d),
    ``num_layers``, ``add_eos``, ``image_token_id`` (what the processor writes per visual token), ``mrope``
    (positions are (3, B, L) M-RoPE ids), ``causal``, ``processor`` (the processor family: ``composed`` | ``hf``).
    """

    tokenizer: Any
    hidden_size: int
    num_layers: int
    add_eos: bool = True
    image_token_id: int = -1
    mrope: bool = False
    causal: bool = True
    processor: str = "composed"
    #: the ``model.layout`` values this backbone implements (docs/data.md, "Layout")
    layouts: tuple[str, ...] = ("mmembed",)
    layout: str = "mmembed"

    # ------------------------------------------------------------------------------------------
    # what the builder asks

    @classmethod
    def check_slots(cls, cfg: Any, prefix: str = "model") -> None:
        """Refuse model slots this backbone cannot take (composed: a connector and token reduction need
        ``model.vision``). Runs in recipe validation, before anything is built."""
        cls.check_layout(cfg, prefix)
        if cfg.vision is None:
            for slot in ("connector", "merge", "prune"):
                if getattr(cfg, slot) is not None:
                    raise ConfigError(f"{prefix}.{slot}", f"model.{slot} needs a vision encoder (model.vision)")
        elif cfg.connector is None:
            raise ConfigError(f"{prefix}.connector", "a vision encoder needs a connector (e.g. {type: mlp})")

    @classmethod
    def check_layout(cls, cfg: Any, prefix: str = "model") -> None:
        """Refuse a ``model.layout`` this backbone does not implement."""
        layout = getattr(cfg, "layout", "mmembed")
        if layout not in cls.layouts:
            raise ConfigError(
                f"{prefix}.layout",
                f"backbone '{cfg.backbone['type']}' implements layout {', '.join(cls.layouts)}, not {layout!r} "
                "(vlm2vec is VLM2Vec's own layout, for the native qwen2_vl and llava backbones)",
            )

    def use_layout(self, layout: str) -> None:
        """Lay rows out as ``layout`` says (the builder calls this before building the visual path)."""
        if layout not in self.layouts:
            raise ConfigError("model.layout", f"{type(self).__name__} implements {self.layouts}, not {layout!r}")
        self.layout = layout

    def visual_path(
        self, vision: nn.Module | None, connector: nn.Module | None, merger: nn.Module | None, pruner: Any
    ) -> VisualPath | None:
        """The visual path built from the model's slots (``None``: a text-only model)."""
        return None if vision is None else ComposedVisual(vision, connector, merger)

    def connector_in_dim(self) -> int:
        """Width of the vision features a connector receives when the backbone has its own tower."""
        raise ConfigError("model.connector", f"{type(self).__name__} has no vision tower of its own")

    def add_placeholder(self, token: str) -> int:
        """Add ``token`` to the tokenizer as a special token (resizing embeddings if needed); return its id."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------
    # forward

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, d) token embeddings of the wrapped HF model."""
        return self.model.get_input_embeddings()(input_ids)

    def language_model(self) -> Any:
        """The HF decoder that :meth:`language_forward` and :func:`pruned_forward` run."""
        return self.model

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        visual: list[VisualItem] | None = None,
        pruner: Any = None,
        all_layers: bool = False,
    ) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
        """A processor batch with its visual rows -> (hidden, attention_mask, pool_mask); see the module doc."""
        return self.decode(self.splice(batch, visual), pruner, all_layers)

    def splice(self, batch: dict[str, torch.Tensor], visual: list[VisualItem] | None) -> Spliced:
        """The batch's token embeddings with ``visual`` written in and every position numbered."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        pool = batch.get("pool_mask", mask)
        return splice_visual(self.embed(ids), ids, mask, pool, visual, self.image_token_id, self.mrope)

    def decode(
        self, sp: Spliced, pruner: Any = None, all_layers: bool = False
    ) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
        """The spliced sequence through the LLM; with a pruner and visual tokens, layer by layer (AIM §5b)."""
        pos = sp.position_ids if self.mrope else sp.position_ids[0]
        if pruner is not None and bool(sp.visual.any()):
            hidden, kept = pruned_forward(
                self.language_model(),
                sp.embeds,
                sp.attention_mask,
                pos,
                sp.visual,
                pruner,
                causal=self.causal,
                all_layers=all_layers,
            )
            return hidden, sp.attention_mask * kept, sp.pool_mask * kept
        return self.language_forward(sp.embeds, sp.attention_mask, pos, all_layers), sp.attention_mask, sp.pool_mask

    def language_forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        all_layers: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """(B, L, d) -> last hidden state (B, L, d), or a tuple of every layer's (B, L, d) output."""
        out = self.language_model()(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=all_layers,
            use_cache=False,
        )
        return hidden_of(out, all_layers)

    # ------------------------------------------------------------------------------------------
    # training and saving

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
