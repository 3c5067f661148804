"""Adapters that plug an mmembed model into other frameworks, each behind its own extra (docs/adapters.md).

- :mod:`mmembed.adapters.mteb`: an mteb 2.x encoder (``pip install mmembed[mteb]``).
- :mod:`mmembed.adapters.langchain`: a LangChain ``Embeddings`` (``pip install mmembed[langchain]``).
- :mod:`mmembed.adapters.llama_index`: a LlamaIndex ``MultiModalEmbedding`` (``pip install mmembed[llamaindex]``).

Importing this package imports none of those frameworks; each module imports its own and says which extra to
install when it is missing. Every adapter takes a loaded :class:`~mmembed.EmbeddingModel` or a model directory
(loaded with :func:`mmembed.load`) and returns exactly what the model's ``encode_query`` / ``encode_document`` give.
"""

from __future__ import annotations
