"""A LlamaIndex ``MultiModalEmbedding`` over an mmembed model:
``VectorStoreIndex(nodes, embed_model=MMEmbedMultiModalEmbedding("out/model"))``.

- ``get_query_embedding`` is the model's ``encode_query`` (its saved ``query`` prompt);
  ``get_text_embedding`` / ``get_text_embedding_batch`` (what LlamaIndex embeds nodes with) its
  ``encode_document`` (the saved ``document`` / ``passage`` / ``corpus`` prompt).
- ``get_image_embedding`` / ``get_image_embedding_batch`` embed images as documents: LlamaIndex's ``ImageType``
  (a path or an ``io.BytesIO``), encoded bytes or a PIL image. ``get_image_query_embedding`` embeds an image as a
  query (image-to-image / image-to-text search).
- The ``_aget_*`` methods run the same code (the model computes on this process's device; there is no remote
  service to await).

The class is a pydantic model (LlamaIndex's ``BaseEmbedding``): the mmembed model is a private attribute, the
encode options a field; ``model_name`` defaults to the directory's name. Vectors are ``list[float]``, equal to the
model's own ``encode_*`` output. Requires the ``llamaindex`` extra: ``pip install mmembed[llamaindex]``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmembed.adapters._common import encode_role, missing, resolve_model
from mmembed.model import EmbeddingModel

try:
    from llama_index.core.bridge.pydantic import Field, PrivateAttr
    from llama_index.core.embeddings import MultiModalEmbedding
except ModuleNotFoundError as e:
    raise ImportError(missing("mmembed.adapters.llama_index", "llama-index-core", "llamaindex")) from e

__all__ = ["MMEmbedMultiModalEmbedding"]

Embedding = list[float]


class MMEmbedMultiModalEmbedding(MultiModalEmbedding):
    """LlamaIndex text and image embeddings from an mmembed model.

    Args:
        model: a loaded :class:`~mmembed.EmbeddingModel` or a model directory (loaded with :func:`mmembed.load`).
        encode_kwargs: more :meth:`EmbeddingModel.encode` options for every call (``truncate_dim``,
            ``normalize_embeddings``, ``instruction``...); ``precision`` must stay ``float32``.
        load_kwargs: for a directory, :func:`mmembed.load` options (``device``, ``dtype``, ``truncate_dim``...).
        **kwargs: ``BaseEmbedding`` fields: ``model_name``, ``embed_batch_size`` (also mmembed's ``batch_size``),
            ``callback_manager``, ``embeddings_cache``...
    """

    encode_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Options of mmembed's EmbeddingModel.encode applied to every call."
    )
    _model: EmbeddingModel = PrivateAttr()

    def __init__(
        self,
        model: EmbeddingModel | str | os.PathLike,
        *,
        encode_kwargs: dict[str, Any] | None = None,
        load_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        resolved = resolve_model(model, **dict(load_kwargs or {}))
        encode_kwargs = dict(encode_kwargs or {})
        if encode_kwargs.get("precision", "float32") != "float32":
            raise ValueError("LlamaIndex stores float vectors; use precision='float32' (the default)")
        if "model_name" not in kwargs:
            kwargs["model_name"] = (
                f"mmembed/{Path(model).resolve().name}" if isinstance(model, (str, os.PathLike)) else "mmembed"
            )
        super().__init__(encode_kwargs=encode_kwargs, **kwargs)
        self._model = resolved

    @classmethod
    def class_name(cls) -> str:
        return "MMEmbedMultiModalEmbedding"

    @property
    def model(self) -> EmbeddingModel:
        """The wrapped mmembed model."""
        return self._model

    def embed(
        self,
        texts: Sequence[str | None] | None = None,
        images: Sequence[Any] | None = None,
        role: str | None = "document",
    ) -> list[Embedding]:
        """Aligned rows of text and/or images (any item ``None``) with ``encode_document`` (``role="document"``),
        ``encode_query`` (``"query"``) or ``encode`` (``None``)."""
        if isinstance(texts, str):
            raise TypeError("texts is a list of strings; use get_query_embedding / get_text_embedding for one text")
        kwargs = {"batch_size": self.embed_batch_size, "show_progress_bar": False, **self.encode_kwargs}
        return encode_role(self._model, role, texts, images, **kwargs).tolist()

    # text
    def _get_query_embedding(self, query: str) -> Embedding:
        return self.embed(texts=[query], role="query")[0]

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return self._get_query_embedding(query)

    def _get_text_embedding(self, text: str) -> Embedding:
        return self.embed(texts=[text], role="document")[0]

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return self._get_text_embedding(text)

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self.embed(texts=list(texts), role="document") if texts else []

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._get_text_embeddings(texts)

    # images
    def _get_image_embedding(self, img_file_path: Any) -> Embedding:
        return self.embed(images=[img_file_path], role="document")[0]

    async def _aget_image_embedding(self, img_file_path: Any) -> Embedding:
        return self._get_image_embedding(img_file_path)

    def _get_image_embeddings(self, img_file_paths: list[Any]) -> list[Embedding]:
        return self.embed(images=list(img_file_paths), role="document") if img_file_paths else []

    async def _aget_image_embeddings(self, img_file_paths: list[Any]) -> list[Embedding]:
        return self._get_image_embeddings(img_file_paths)

    def get_image_query_embedding(self, img_file_path: Any) -> Embedding:
        """One image embedded as a query (``encode_query``), for image-to-image or image-to-text search."""
        return self.embed(images=[img_file_path], role="query")[0]
