"""The embedding model: visual path -> backbone -> pooler -> fusion -> projection + normalization.

One data path for every backbone (docs/architecture.md §2): the visual path turns the batch's images into visual
rows (or ``None``), the backbone splices them and runs the LLM (pruning inside it when a pruner is set) and returns
hidden states with the masks that align with them, the pooler reduces those to one vector per row.
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

from mmembed import api
from mmembed.config import ModelCfg
from mmembed.io import save_model
from mmembed.processing import BaseProcessor
from mmembed.types import ImageRef, InputError, Side, VideoRef
from mmembed.visual import VisualPath, has_pixels

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

    Build with :func:`mmembed.build_model` or :func:`mmembed.load`. Slots (registered modules): ``vision``,
    ``connector``, ``merge``, ``prune``, ``backbone``, ``pooler``, ``fusion`` and the optional ``proj``; ``visual``
    (a :class:`~mmembed.visual.VisualPath` over them, or ``None`` for text-only models) and ``processor`` are plain
    attributes.
    """

    def __init__(
        self,
        cfg: ModelCfg,
        backbone: nn.Module,
        pooler: nn.Module,
        processor: BaseProcessor,
        visual: VisualPath | None = None,
        *,
        vision: nn.Module | None = None,
        connector: nn.Module | None = None,
        merge: nn.Module | None = None,
        prune: nn.Module | None = None,
        fusion: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision, self.connector, self.merge, self.prune = vision, connector, merge, prune
        self.backbone, self.pooler, self.fusion = backbone, pooler, fusion
        self.proj = nn.Linear(backbone.hidden_size, cfg.embed_dim, bias=False) if cfg.embed_dim else None
        self.visual, self.processor = visual, processor
        #: keep the first ``truncate_dim`` dims of ``encode``'s output (``None``: all); ``mmembed.load(truncate_dim=)``
        self.truncate_dim: int | None = None
        #: the dims trained with ``loss.matryoshka_dims`` (written to the model directory and its card), or ``None``
        self.matryoshka_dims: tuple[int, ...] | None = None
        self._similarity_fn_name: str | None = None
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

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A processor batch -> (B, D) embeddings (L2-normalized when ``cfg.normalize``)."""
        return self.forward_with_aux(batch)[0]

    def forward_with_aux(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B, D) embeddings and auxiliary outputs for the loss.

        ``aux`` holds, with a ``late_fusion`` that has ``micl_token`` set (NoteLLM-2 mICL), ``visual`` (B, D): the
        hidden state just before the compression token, through the same gate/projection/normalization, and
        ``visual_mask`` (B,) bool: rows that contain the token. Otherwise ``aux`` is empty.
        """
        batch = self.processor.to(batch, self.device)
        rows, dummy = None, None
        if self.visual is not None:
            rows = self.visual(batch)
            if (self.training or self.uniform_modules) and not has_pixels(batch):
                # a text-only batch runs the visual path on a blank image (added times 0 below) at the point where a
                # batch with images runs it, so every rank calls the same modules in the same order (ZeRO-3)
                dummy = self.visual.blank()
        hidden, attention, pool_mask = self.backbone(
            batch, rows, pruner=self.prune, all_layers=self.pooler.needs_all_layers
        )
        pooled = self.pooler(hidden, attention, pool_mask)
        if dummy is not None:
            pooled = pooled + 0.0 * dummy.to(pooled.dtype)
        aux: dict[str, torch.Tensor] = {}
        if self.fusion is not None:
            pooled, aux = self._fuse(batch, pooled, hidden)
        return self._finish(pooled), aux

    def _fuse(
        self, batch: dict[str, torch.Tensor], pooled: torch.Tensor, hidden: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Late fusion (NoteLLM-2) of the pooled text rep with the rows' global image features, and the mICL rep."""
        rows = pooled.shape[0]
        if self.visual is None:
            counts = batch["image_counts"].to(pooled.device)
            image_global, has_image = torch.zeros(rows, self.backbone.hidden_size, device=pooled.device), counts > 0
        else:
            image_global, has_image = self.visual.global_feature(batch, rows)
        fused = self.fusion(pooled, image_global, has_image)
        aux: dict[str, torch.Tensor] = {}
        token_id = getattr(self.fusion, "micl_token_id", None)
        if token_id is not None:
            last = hidden[-1] if isinstance(hidden, tuple) else hidden
            marks = batch["input_ids"] == token_id  # (B, L)
            before = (marks.to(torch.int64).argmax(dim=1) - 1).clamp_min(0)
            visual_rep = last[torch.arange(last.shape[0], device=last.device), before]
            has_mark = marks.any(dim=1)  # (B,)
            # rows without the token fall back to their main representation (padding-independent)
            visual_rep = torch.where(has_mark[:, None], visual_rep, pooled)
            aux["visual"] = self._finish(self.fusion(visual_rep, image_global, has_image))
            aux["visual_mask"] = has_mark
        return fused, aux

    def _finish(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.proj is not None:
            pooled = self.proj(pooled)
        pooled = pooled.float()
        return F.normalize(pooled, dim=-1) if self.cfg.normalize else pooled

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
        *,
        prompt: str | None = None,
        prompt_name: str | None = None,
        normalize_embeddings: bool = False,
        truncate_dim: int | None = None,
        precision: str = "float32",
        videos: Sequence[VideoRef | None] | None = None,
        video_options: Any = None,
    ) -> np.ndarray | torch.Tensor:
        """Embed aligned lists of texts, images and videos; any item may be ``None``.

        The keyword-only arguments are sentence-transformers' (``SentenceTransformer.encode``, same semantics and
        order of operations: :mod:`mmembed.api`).

        Args:
            texts: strings (may contain the image placeholder), or ``None`` items for image-only rows.
            images: per row a PIL image, a path, bytes, a list of those, or ``None`` for text-only rows.
            instruction: one instruction for all rows, one per row, or the name of a saved prompt.
            batch_size: rows per forward; rows are grouped by length to cut padding.
            show_progress_bar: ``None`` shows one on long inputs.
            convert_to: ``numpy`` (array) or ``torch`` (CPU tensor).
            prompt: literal instruction text for all rows (never looked up); instead of ``instruction``.
            prompt_name: a saved prompt (``model.cfg.prompts``); unknown names are an error. Instead of ``instruction``.
            normalize_embeddings: L2-normalize after truncation (a truncated unit vector is not one otherwise).
            truncate_dim: keep the first d dims (Matryoshka); default ``self.truncate_dim``.
            precision: ``float32``, or ``int8`` / ``uint8`` (ranges from this output) / ``binary`` / ``ubinary``
                (packed bits, (N, ceil(d / 8))), as ``mmembed.api.quantize_embeddings``.
            videos: per row one video: a file path, its bytes, a list of frames (PIL images, image paths or
                (H, W, 3) uint8 arrays) or a (T, H, W, 3) array, or ``None``; placed at ``<|video_1|>`` in the text,
                else before it (docs/video.md). Native models with a video path only.
            video_options: this call's sampling and resizing: a :class:`mmembed.video.VideoOptions`, or a mapping of
                its keys (``fps``, ``max_frames``, ``max_pixels``, ...) over the recipe's ``model.backbone.video``.

        Returns:
            (N, d) float32 (L2-normalized when the model normalizes and nothing is truncated), or the quantized array.
            Empty input gives (0, d).
        """
        from tqdm.auto import tqdm

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if convert_to not in ("numpy", "torch"):
            raise ValueError(f"convert_to must be 'numpy' or 'torch', got {convert_to!r}")
        api.check_precision(precision)
        truncate_dim = api.check_truncate_dim(
            truncate_dim if truncate_dim is not None else self.truncate_dim, self.embed_dim
        )
        instruction = api.resolve_instruction(self.cfg.prompts, instruction, prompt, prompt_name)
        sides = self._rows(texts, images, instruction, videos)
        call = {}
        if video_options is not None:
            if getattr(self.processor, "video_options", None) is None:
                raise ValueError("video_options given but this model takes no video input")
            from mmembed.processing.native import resolve_video_options

            call["video_options"] = resolve_video_options(self.processor.video_options, video_options)
        out = torch.empty(len(sides), self.embed_dim, dtype=torch.float32)
        order = sorted(range(len(sides)), key=lambda i: -self.processor.length(sides[i]))
        starts = range(0, len(order), max(1, batch_size))
        show = len(starts) >= 8 if show_progress_bar is None else show_progress_bar
        was_training = self.training
        self.eval()
        try:
            for s in tqdm(starts, desc="encode", disable=not show, unit="batch"):
                idx = order[s : s + batch_size]
                batch = self.processor([sides[i] for i in idx], rows=idx, **call)
                out[idx] = self(batch).float().cpu()
        finally:
            self.train(was_training)
        return api.postprocess(out, truncate_dim, normalize_embeddings, precision, convert_to)

    def encode_query(
        self,
        texts: Sequence[str | None] | None = None,
        images: Sequence[ImageRef | Sequence[ImageRef] | None] | None = None,
        instruction: str | Sequence[str | None] | None = None,
        **kwargs: Any,
    ) -> np.ndarray | torch.Tensor:
        """:meth:`encode` with the saved ``query`` prompt when no instruction is given (sentence-transformers'
        ``encode_query``); a model without one encodes with no instruction (:func:`mmembed.api.role_prompt`)."""
        return self._encode_role("query", texts, images, instruction, kwargs)

    def encode_document(
        self,
        texts: Sequence[str | None] | None = None,
        images: Sequence[ImageRef | Sequence[ImageRef] | None] | None = None,
        instruction: str | Sequence[str | None] | None = None,
        **kwargs: Any,
    ) -> np.ndarray | torch.Tensor:
        """:meth:`encode` with the saved ``document`` (else ``passage``, else ``corpus``) prompt when no instruction is
        given (sentence-transformers' ``encode_document``); none saved: no instruction."""
        return self._encode_role("document", texts, images, instruction, kwargs)

    def _encode_role(self, role: str, texts: Any, images: Any, instruction: Any, kwargs: dict[str, Any]) -> Any:
        if instruction is None and kwargs.get("prompt") is None and kwargs.get("prompt_name") is None:
            kwargs["prompt_name"] = api.role_prompt(self.cfg.prompts, role)
        return self.encode(texts, images, instruction, **kwargs)

    def _rows(self, texts: Any, images: Any, instruction: Any, videos: Any = None) -> list[Side]:
        if isinstance(texts, str) or isinstance(images, (str, os.PathLike)) or isinstance(videos, (str, os.PathLike)):
            raise TypeError("texts, images and videos are lists (one item per row); wrap a single item in a list")
        lengths = {k: len(v) for k, v in (("texts", texts), ("images", images), ("videos", videos)) if v is not None}
        if len(set(lengths.values())) > 1:
            shown = " and ".join(f"{k} ({n})" for k, n in lengths.items())
            raise ValueError(f"{shown} must be aligned lists of the same length")
        n = next(iter(lengths.values()), 0)
        if isinstance(instruction, str) or instruction is None:  # a saved prompt name is resolved by encode
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
            vid = None if videos is None else videos[i]
            vids = [] if vid is None else [list(vid) if isinstance(vid, np.ndarray) else vid]
            text = None if texts is None else texts[i]
            sides.append(Side(instruction=instructions[i], text=text, images=imgs, videos=vids))
        return sides

    @property
    def similarity_fn_name(self) -> str:
        """``cosine`` | ``dot`` | ``euclidean`` | ``manhattan``: what :meth:`similarity` computes. Saved in the model
        directory (``similarity``); by default ``cosine`` for a normalizing model, else ``dot``."""
        return self._similarity_fn_name or ("cosine" if self.cfg.normalize else "dot")

    @similarity_fn_name.setter
    def similarity_fn_name(self, value: str | None) -> None:
        self._similarity_fn_name = None if value is None else api.check_similarity_fn_name(value)

    def similarity(self, a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Pairwise scores (N, M) with :attr:`similarity_fn_name` (:func:`mmembed.api.similarity`): a tensor for a
        tensor ``a``, else a numpy array. MMEB scores with a plain dot product of the normalized embeddings."""
        return api.similarity(a, b, self.similarity_fn_name)

    def similarity_pairwise(self, a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> Any:
        """Row-wise scores (N,) of ``a[i]`` against ``b[i]`` with :attr:`similarity_fn_name`."""
        return api.similarity_pairwise(a, b, self.similarity_fn_name)

    def get_embedding_dimension(self) -> int:
        """Width of :meth:`encode`'s float output: ``truncate_dim`` when set, else :attr:`embed_dim`."""
        return self.truncate_dim or self.embed_dim

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the self-describing model directory (see :func:`mmembed.io.save_model`)."""
        return save_model(self, directory)
