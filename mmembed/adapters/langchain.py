"""A LangChain ``Embeddings`` over an mmembed model: ``InMemoryVectorStore(MMEmbedEmbeddings("out/model"))``.

- ``embed_documents(texts)`` is the model's ``encode_document`` (its saved ``document`` / ``passage`` / ``corpus``
  prompt), ``embed_query(text)`` its ``encode_query`` (the saved ``query`` prompt); ``aembed_documents`` /
  ``aembed_query`` run them in LangChain's executor (``langchain_core.embeddings.Embeddings``' defaults).
- ``embed_image(uris)`` embeds images (paths, encoded bytes or PIL images) as documents, the method name
  LangChain's OpenCLIP integration (``langchain_experimental.open_clip.OpenCLIPEmbeddings``) uses and that
  multimodal vector stores (Chroma's ``add_images``) call; ``embed_image_query(uris)`` embeds them as queries.
- ``embed(texts=, images=, role=)`` embeds aligned text / image rows (interleaved inputs) with any role.

Vectors are plain ``list[float]``, equal to the model's own ``encode_*`` output (float32 values as Python floats).
Requires the ``langchain`` extra: ``pip install mmembed[langchain]``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from mmembed.adapters._common import encode_role, missing, resolve_model
from mmembed.model import EmbeddingModel

try:
    from langchain_core.embeddings import Embeddings
    from langchain_core.runnables.config import run_in_executor
except ModuleNotFoundError as e:
    raise ImportError(missing("mmembed.adapters.langchain", "langchain-core", "langchain")) from e

__all__ = ["MMEmbedEmbeddings"]


class MMEmbedEmbeddings(Embeddings):
    """LangChain embeddings from an mmembed model.

    Args:
        model: a loaded :class:`~mmembed.EmbeddingModel` or a model directory (loaded with :func:`mmembed.load`).
        batch_size: rows per forward pass of ``encode``.
        encode_kwargs: more :meth:`EmbeddingModel.encode` options for every call (``truncate_dim``,
            ``normalize_embeddings``, ``instruction``...); ``precision`` must stay ``float32`` (LangChain stores
            float vectors).
        **load_kwargs: for a directory, :func:`mmembed.load` options (``device``, ``dtype``, ``truncate_dim``...).
    """

    def __init__(
        self,
        model: EmbeddingModel | str | os.PathLike,
        *,
        batch_size: int = 32,
        encode_kwargs: dict[str, Any] | None = None,
        **load_kwargs: Any,
    ) -> None:
        self.model = resolve_model(model, **load_kwargs)
        self.encode_kwargs = {"batch_size": batch_size, "show_progress_bar": False, **dict(encode_kwargs or {})}
        if self.encode_kwargs.get("precision", "float32") != "float32":
            raise ValueError("LangChain stores float vectors; use precision='float32' (the default)")

    def embed(
        self,
        texts: Sequence[str | None] | None = None,
        images: Sequence[Any] | None = None,
        role: str | None = "document",
    ) -> list[list[float]]:
        """Aligned rows of text and/or images (any item ``None``) with ``encode_document`` (``role="document"``),
        ``encode_query`` (``"query"``) or ``encode`` (``None``)."""
        if isinstance(texts, str):
            raise TypeError("texts is a list of strings; use embed_query for one text")
        return encode_role(self.model, role, texts, images, **self.encode_kwargs).tolist()

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """One vector per text, with the model's document prompt (``encode_document``)."""
        return self.embed(texts=list(texts), role="document") if texts else []

    def embed_query(self, text: str) -> list[float]:
        """One vector, with the model's query prompt (``encode_query``)."""
        return self.embed(texts=[text], role="query")[0]

    def embed_image(self, uris: list[str]) -> list[list[float]]:
        """One vector per image (a path, encoded bytes or a PIL image), embedded as a document."""
        return self.embed(images=list(uris), role="document") if uris else []

    def embed_image_query(self, uris: list[str]) -> list[list[float]]:
        """One vector per image, embedded as a query (image-to-text or image-to-image search)."""
        return self.embed(images=list(uris), role="query") if uris else []

    async def aembed_image(self, uris: list[str]) -> list[list[float]]:
        """:meth:`embed_image` in LangChain's executor."""
        return await run_in_executor(None, self.embed_image, uris)

    def __repr__(self) -> str:
        return f"MMEmbedEmbeddings(dim={self.model.get_embedding_dimension()})"
