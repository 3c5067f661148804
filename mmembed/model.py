"""The composed embedding model: vision -> connector -> splice -> backbone -> pooler -> projection.

Visual rows are written into ``inputs_embeds`` at the placeholder positions; the attention mask and
position ids are built after splicing (``cumsum(mask) - 1``, so left and right padding give the same
embedding, ALGORITHMS.md §6.3 and §8).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmembed.config import ModelCfg
from mmembed.data.sample import ImageRef, Side
from mmembed.processing import InputError, Processor

__all__ = ["EmbeddingModel"]


def _check_text(row: int, what: str, value: Any) -> None:
    """A text field is ``None`` or a string the tokenizer can take (no lone UTF-16 surrogates)."""
    if value is None:
        return
    if not isinstance(value, str):
        raise InputError(f"row {row}: {what} must be a string or None, got {type(value).__name__} {value!r:.40}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(
            f"row {row}: {what} is not valid Unicode (lone surrogate {value[e.start]!r} at character {e.start})"
        ) from None


class EmbeddingModel(nn.Module):
    """One normalized vector per input (text, image(s), or both), steered by an instruction.

    Build with :func:`mmembed.build_model` or :func:`mmembed.load`; the slots are ``vision``,
    ``connector``, ``reducer``, ``backbone``, ``pooler``, ``fusion`` and the optional ``proj``.
    """

    def __init__(
        self,
        cfg: ModelCfg,
        backbone: nn.Module,
        pooler: nn.Module,
        processor: Processor,
        vision: nn.Module | None = None,
        connector: nn.Module | None = None,
        reducer: nn.Module | None = None,
        fusion: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision, self.connector, self.reducer = vision, connector, reducer
        self.backbone, self.pooler, self.fusion = backbone, pooler, fusion
        self.proj = nn.Linear(backbone.hidden_size, cfg.embed_dim, bias=False) if cfg.embed_dim else None
        self.processor = processor
        # Run the visual path on text-only batches too (times 0), so every rank runs the same modules in every
        # forward: training always needs it; ZeRO-3 evaluation sets it (the training loop does).
        self.uniform_modules = False

    # ------------------------------------------------------------------------------------------
    # forward

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim or self.backbone.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N_img, 3, S, S) -> (N_img, N', d) connector (then pre-LLM reducer) outputs, ready to splice."""
        assert self.vision is not None and self.connector is not None
        param = next(self.vision.parameters())
        tokens = self.vision(pixel_values.to(device=param.device, dtype=param.dtype))  # (N_img, N, D_v)
        feats = self.connector(tokens, self.vision.grid())  # (N_img, N', d)
        if self.reducer is not None and getattr(self.reducer, "pre_llm", False):
            feats = self.reducer(feats)  # (N_img, N'', d): merged per image (AIM §5a)
        return feats

    def splice(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token embeddings with the visual rows written at the placeholder positions: (B, L, d)."""
        input_ids = batch["input_ids"]
        embeds = self.backbone.embed(input_ids)
        pixels = batch.get("pixel_values")
        if pixels is None or pixels.shape[0] == 0:
            if (self.training or self.uniform_modules) and self.vision is not None:
                # Text-only batch in training: run the visual path on one blank image and add it times 0,
                # so every rank (and every GradCache chunk) runs the same modules and produces gradients
                # for the same parameters. ZeRO-3 gathers parameters per module call and ZeRO-2 reduces
                # in buckets; both hang or fail when ranks differ (LLaVA adds 0 * visual for the same reason).
                size = self.vision.image_size
                blank = self.image_features(torch.zeros(1, 3, size, size))
                embeds = embeds + 0.0 * blank.sum().to(embeds.dtype)
            return embeds
        feats = self.image_features(pixels)  # (N_img, N', d)
        slots = input_ids == self.processor.placeholder_id  # (B, L)
        per_row = slots.sum(dim=1)
        expected = batch["image_counts"].to(per_row.device) * feats.shape[1]
        if not torch.equal(per_row, expected):
            bad = int((per_row != expected).nonzero()[0, 0])
            raise InputError(
                f"row {bad}: {int(per_row[bad])} image placeholder tokens but {int(expected[bad])} visual tokens "
                f"({int(batch['image_counts'][bad])} image(s) x {feats.shape[1]})"
            )
        return embeds.masked_scatter(slots.unsqueeze(-1), feats.to(embeds.dtype).reshape(-1, feats.shape[-1]))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A processor batch -> (B, D) embeddings (L2-normalized when ``cfg.normalize``)."""
        return self.forward_with_aux(batch)[0]

    def forward_with_aux(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B, D) embeddings and auxiliary outputs for the loss.

        ``aux`` holds, with a ``late_fusion`` that has ``micl_token`` set (NoteLLM-2 mICL), ``visual`` (B, D): the
        hidden state just before the compression token, through the same gate/projection/normalization, and
        ``visual_mask`` (B,) bool: rows that contain the token. Otherwise ``aux`` is empty.
        """
        device = self.device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        attention_mask = batch["attention_mask"]
        pool_attention, pool_mask = attention_mask, batch["pool_mask"]
        if not getattr(self.backbone, "native", False):
            embeds = self.splice(batch)
            position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp_min(0)  # after splicing: pad-side independent
        all_layers = self.pooler.needs_all_layers
        has_pixels = batch.get("pixel_values") is not None and batch["pixel_values"].shape[0] > 0
        if getattr(self.backbone, "native", False):  # the HF VLM's own forward (vision tower inside)
            # (B, L') masks: the sequence is rebuilt when a connector or reducer changes the visual tokens
            hidden, pool_attention, pool_mask = self.backbone.forward_native(
                batch, all_layers=all_layers, reducer=self.reducer, uniform=self.training or self.uniform_modules
            )
        elif self.reducer is not None and getattr(self.reducer, "in_llm", False) and has_pixels:
            visual = batch["input_ids"] == self.processor.placeholder_id  # (B, L)
            hidden, kept = self.backbone.forward_pruned(
                embeds, attention_mask, position_ids, visual, self.reducer, all_layers=all_layers
            )
            pool_attention, pool_mask = attention_mask * kept, pool_mask * kept  # pruned rows leave the pool
        else:
            hidden = self.backbone(embeds, attention_mask, position_ids, all_layers=all_layers)
        pooled = self.pooler(hidden, pool_attention, pool_mask)
        aux: dict[str, torch.Tensor] = {}
        if self.fusion is not None:
            pooled_text = pooled  # (B, d) before the gate
            image_global, has_image = self.image_global(batch, pooled.shape[0])
            pooled = self.fusion(pooled, image_global, has_image)
            token_id = getattr(self.fusion, "micl_token_id", None)
            if token_id is not None:
                last = hidden[-1] if isinstance(hidden, tuple) else hidden
                marks = batch["input_ids"] == token_id  # (B, L)
                before = (marks.to(torch.int64).argmax(dim=1) - 1).clamp_min(0)
                visual_rep = last[torch.arange(last.shape[0], device=last.device), before]
                has_mark = marks.any(dim=1)  # (B,)
                # rows without the token fall back to their main representation (padding-independent)
                visual_rep = torch.where(has_mark[:, None], visual_rep, pooled_text)
                aux["visual"] = self._finish(self.fusion(visual_rep, image_global, has_image))
                aux["visual_mask"] = has_mark
        return self._finish(pooled), aux

    def _finish(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.proj is not None:
            pooled = self.proj(pooled)
        pooled = pooled.float()
        return F.normalize(pooled, dim=-1) if self.cfg.normalize else pooled

    def image_global(self, batch: dict[str, torch.Tensor], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row global image feature (B, D_v) (mean over a row's images) and ``has_image`` (B,) bool.

        Uses ``vision.global_feature`` (CLS / pooled feature) on the same pixels; rows without images get zeros
        (late fusion passes them through). Text-only models give zeros of width d.
        """
        counts = batch["image_counts"].to(self.device)
        pixels = batch.get("pixel_values")
        if self.vision is None:
            return torch.zeros(rows, self.backbone.hidden_size, device=self.device), counts > 0
        width = self.vision.out_dim
        if pixels is None or pixels.shape[0] == 0:
            return torch.zeros(rows, width, device=self.device), counts > 0
        param = next(self.vision.parameters())
        feats = self.vision.global_feature(pixels.to(device=param.device, dtype=param.dtype))  # (N_img, D_v)
        row = torch.repeat_interleave(torch.arange(rows, device=feats.device), counts)
        summed = torch.zeros(rows, feats.shape[-1], device=feats.device, dtype=feats.dtype).index_add(0, row, feats)
        return summed / counts.clamp_min(1)[:, None].to(feats.dtype), counts > 0

    # ------------------------------------------------------------------------------------------
    # inference API

    @torch.inference_mode()
    def encode(
        self,
        texts: Sequence[str | None] | None = None,
        images: Sequence[ImageRef | Sequence[ImageRef] | None] | None = None,
        instruction: str | Sequence[str | None] | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        convert_to: str = "numpy",
    ) -> np.ndarray | torch.Tensor:
        """Embed aligned lists of texts and images; any item may be ``None``.

        Args:
            texts: strings (may contain the image placeholder), or ``None`` items for image-only rows.
            images: per row a PIL image, a path, bytes, a list of those, or ``None`` for text-only rows.
            instruction: one instruction for all rows, one per row, or the name of a saved prompt.
            batch_size: rows per forward; rows are grouped by length to cut padding.
            show_progress_bar: ``None`` shows one on long inputs.
            convert_to: ``numpy`` (float32 array) or ``torch`` (CPU float32 tensor).

        Returns:
            (N, D) float32, L2-normalized when the model normalizes. Empty input gives (0, D).
        """
        from tqdm.auto import tqdm

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        sides = self._rows(texts, images, instruction)
        out = torch.empty(len(sides), self.embed_dim, dtype=torch.float32)
        order = sorted(range(len(sides)), key=lambda i: -self.processor.length(sides[i]))
        starts = range(0, len(order), max(1, batch_size))
        show = len(starts) >= 8 if show_progress_bar is None else show_progress_bar
        was_training = self.training
        self.eval()
        try:
            for s in tqdm(starts, desc="encode", disable=not show, unit="batch"):
                idx = order[s : s + batch_size]
                batch = self.processor([sides[i] for i in idx], rows=idx)
                out[idx] = self(batch).float().cpu()
        finally:
            self.train(was_training)
        if convert_to == "torch":
            return out
        if convert_to != "numpy":
            raise ValueError(f"convert_to must be 'numpy' or 'torch', got {convert_to!r}")
        return out.numpy()

    def _rows(self, texts: Any, images: Any, instruction: Any) -> list[Side]:
        if isinstance(texts, str) or isinstance(images, (str, os.PathLike)):
            raise TypeError("texts and images are lists (one item per row); wrap a single item in a list")
        n_t = None if texts is None else len(texts)
        n_i = None if images is None else len(images)
        if n_t is not None and n_i is not None and n_t != n_i:
            raise ValueError(f"texts ({n_t}) and images ({n_i}) must be aligned lists of the same length")
        n = n_t if n_t is not None else (n_i or 0)
        if isinstance(instruction, str) or instruction is None:
            instruction = self.cfg.prompts.get(instruction, instruction) if instruction else None
            instructions = [instruction] * n
        else:
            instructions = list(instruction)
            if len(instructions) != n:
                raise ValueError(f"{len(instructions)} instructions for {n} rows")
        sides = []
        for i in range(n):
            for what, value in (("text", None if texts is None else texts[i]), ("instruction", instructions[i])):
                _check_text(i, what, value)
            img = None if images is None else images[i]
            imgs = [] if img is None else (list(img) if isinstance(img, (list, tuple)) else [img])
            sides.append(Side(instruction=instructions[i], text=None if texts is None else texts[i], images=imgs))
        return sides

    @staticmethod
    def similarity(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Pairwise scores (N, M) = a @ b.T: cosine for normalized embeddings (MMEB scores with a plain dot)."""
        if isinstance(a, torch.Tensor):
            return a @ torch.as_tensor(b, dtype=a.dtype, device=a.device).T
        return np.asarray(a) @ np.asarray(b).T

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the self-describing model directory (see :func:`mmembed.io.save_model`)."""
        from mmembed.io import save_model

        return save_model(self, directory)
