"""A sentence-transformers input module that wraps a whole mmembed model (composed models, and native ones whose
settings plain transformers cannot express): ``modules.json`` names ``mmembed.export.st_module.MMEmbedModule``.

It follows sentence-transformers 6.3's module API (``sentence_transformers/base/modules/input_module.py`` and
``module.py``; https://sbert.net/docs/sentence_transformer/usage/custom_models.html): ``preprocess(inputs, prompt)``
builds the batch with the model's own processor, ``forward(features)`` writes ``features["sentence_embedding"]``
(the model's output, already L2-normalized when it normalizes, so no ``Normalize`` follows), ``save`` writes an
mmembed model directory into the module's folder and ``load`` reads it back with :func:`mmembed.load` (offline,
no remote code, weights from safetensors only).

Loading: sentence-transformers 6 imports a module class outside ``sentence_transformers.*`` only with
``SentenceTransformer(OUT, trust_remote_code=True)`` (``sentence_transformers.util.misc.import_module_class``, "now
requires trust_remote_code=True whenever model_name_or_path is set", installed packages included). The export also
writes ``requirements: {mmembed: ...}`` into ``config_sentence_transformers.json``, which sentence-transformers checks
before any module loads (``check_version_requirements``): without mmembed the error says ``pip install mmembed[st]``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from sentence_transformers.base.modules import InputModule

from mmembed.types import InputError, Side

__all__ = ["MMEmbedModule", "to_sides", "MODEL_FOLDER"]

#: the module's folder inside an export (``modules.json`` path)
MODEL_FOLDER = "0_MMEmbedModule"


def _is_image(x: Any) -> bool:
    return isinstance(x, (Image.Image, bytes, bytearray, os.PathLike))


def _from_messages(messages: Sequence[dict[str, Any]], row: int) -> Side:
    """A chat message list (``system`` text = the instruction; user text and ``image`` items = the row)."""
    instr, texts, images = [], [], []
    for m in messages:
        content = m.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
        for p in parts:
            kind = p.get("type")
            if kind == "text":
                (instr if m.get("role") == "system" else texts).append(p.get("text") or "")
            elif kind == "image":
                images.append(p.get("image", p.get("path", p.get("url"))))
            else:
                raise InputError(f"row {row}: message content type {kind!r} is not supported (text, image)")
    return Side(instruction="".join(instr) or None, text="".join(texts) if texts else None, images=images)


def to_sides(inputs: Sequence[Any], prompt: str | None = None) -> list[Side]:
    """sentence-transformers inputs -> mmembed rows.

    Accepted per row: a string (text), a PIL image / bytes / ``os.PathLike`` (one image; a *string* is always
    text, never a path), a dict with ``text`` and/or ``image`` (one image or a list), or a chat message list
    (``[{"role": "system" | "user", "content": ...}]``). ``prompt`` is the instruction of every row (the saved
    prompt of ``encode_query`` / ``encode_document``, as mmembed's ``instruction=``); a message list's system
    text takes its place.
    """
    sides = []
    for i, x in enumerate(inputs):
        if isinstance(x, str):
            side = Side(instruction=prompt, text=x, images=[])
        elif _is_image(x):
            side = Side(instruction=prompt, text=None, images=[x])
        elif isinstance(x, dict) and "role" in x:
            side = _from_messages([x], i)
        elif isinstance(x, dict):
            unknown = set(x) - {"text", "image"}
            if unknown:
                raise InputError(f"row {i}: unsupported keys {sorted(unknown)} (text, image)")
            img = x.get("image")
            imgs = [] if img is None else list(img) if isinstance(img, (list, tuple)) else [img]
            side = Side(instruction=prompt, text=x.get("text"), images=imgs)
        elif isinstance(x, (list, tuple)) and x and all(isinstance(m, dict) and "role" in m for m in x):
            side = _from_messages(x, i)
            if side.instruction is None:
                side = Side(instruction=prompt, text=side.text, images=side.images)
        else:
            raise InputError(f"row {i}: expected a string, an image, a {{text, image}} dict or messages")
        sides.append(side)
    return sides


class MMEmbedModule(InputModule):
    """A whole :class:`~mmembed.model.EmbeddingModel` as one sentence-transformers module.

    ``preprocess`` -> the model's processor batch (``input_ids`` (B, L), ``attention_mask`` (B, L), pixels...);
    ``forward`` -> ``features["sentence_embedding"]`` (B, D) float32.
    """

    save_in_root = False

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    @property
    def modalities(self) -> list[Any]:
        return ["text", "image", ("image", "text"), "message"]

    @property
    def tokenizer(self) -> Any:  # type: ignore[override]
        return self.model.processor.tokenizer

    def preprocess(self, inputs: Sequence[Any], prompt: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """Rows -> the processor batch; ``kwargs`` (``task``...) are not used: prompts carry the role."""
        sides = to_sides(inputs, prompt or None)
        return self.model.processor(sides, rows=list(range(len(sides))))

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """``features["sentence_embedding"]``: (B, D) float32, the model's output."""
        batch = {k: v for k, v in features.items() if isinstance(v, torch.Tensor)}
        features["sentence_embedding"] = self.model(batch).float()
        return features

    def get_embedding_dimension(self) -> int:
        return int(self.model.embed_dim)

    def get_config_dict(self) -> dict[str, Any]:
        return {}

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        """An mmembed model directory in ``output_path`` (:func:`mmembed.io.save_model`, safetensors only)."""
        from mmembed.io import save_model

        save_model(self.model, output_path)

    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        **kwargs: Any,
    ) -> MMEmbedModule:
        """The module of an export folder (local or a hub snapshot): :func:`mmembed.load` on its subfolder.

        sentence-transformers' ``trust_remote_code`` only let this class import; the mmembed directory is still
        loaded with mmembed's own default (no remote code of the backbone's HF config).
        """
        import mmembed

        path = cls.load_dir_path(
            model_name_or_path,
            subfolder=subfolder,
            token=token,
            cache_folder=cache_folder,
            revision=revision,
            local_files_only=local_files_only,
        )
        if path is None:
            raise FileNotFoundError(f"{model_name_or_path}: no {subfolder or 'module'} folder")
        return cls(mmembed.load(Path(path)))
