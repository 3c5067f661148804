"""mmembed.adapters.langchain with langchain-core installed: the Embeddings interface equals the model's own
encode_query / encode_document, and an InMemoryVectorStore built on it ranks documents as mmembed does."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import InMemoryVectorStore

from mmembed.adapters.langchain import MMEmbedEmbeddings
from tests.adapters.conftest import assert_close
from tests.conftest import make_image

DOCS = ["a red circle on the left", "two blue squares", "a green triangle at the top", "a cat on a mat", "x y z"]
QUERY = "which shape is blue?"


def test_embeddings_equal_encode_query_and_document(model) -> None:
    emb = MMEmbedEmbeddings(model, batch_size=2)
    assert isinstance(emb, Embeddings)
    docs = emb.embed_documents(DOCS)
    assert isinstance(docs, list) and isinstance(docs[0], list) and isinstance(docs[0][0], float)
    assert_close(docs, model.encode_document(texts=DOCS))
    q = emb.embed_query(QUERY)
    assert_close(q, model.encode_query(texts=[QUERY])[0])
    assert np.abs(np.asarray(q) - np.asarray(emb.embed_documents([QUERY])[0])).max() > 1e-3  # roles differ
    assert_close(asyncio.run(emb.aembed_documents(DOCS)), docs)
    assert_close(asyncio.run(emb.aembed_query(QUERY)), q)
    assert emb.embed_documents([]) == [] and emb.embed_image([]) == []


def test_images_and_interleaved_rows(model, tmp_path) -> None:
    emb = MMEmbedEmbeddings(model)
    imgs = [make_image(i, size=(40 + 8 * i, 48)) for i in range(3)]
    paths = []
    for i, img in enumerate(imgs):
        paths.append(str(tmp_path / f"{i}.png"))
        img.save(paths[-1])
    expected = model.encode_document(images=imgs)
    assert_close(emb.embed_image(paths), expected)  # file paths, as LangChain's OpenCLIPEmbeddings takes
    buf = io.BytesIO()
    imgs[1].save(buf, format="PNG")
    assert_close(emb.embed_image([imgs[0], buf.getvalue(), buf]), expected[[0, 1, 1]])  # PIL, bytes, file object
    assert_close(asyncio.run(emb.aembed_image(paths[:1])), expected[:1])
    assert_close(emb.embed_image_query(paths), model.encode_query(images=imgs))
    rows = emb.embed(texts=["what is this?", None], images=[imgs[0], [imgs[1], imgs[2]]], role=None)
    assert_close(rows, model.encode(texts=["what is this?", None], images=[imgs[0], [imgs[1], imgs[2]]]))


def test_in_memory_vector_store_ranks_as_mmembed(model) -> None:
    store = InMemoryVectorStore.from_texts(DOCS, MMEmbedEmbeddings(model), metadatas=[{"i": i} for i in range(5)])
    scores = model.similarity(model.encode_query(texts=[QUERY]), model.encode_document(texts=DOCS))[0]
    expected = np.argsort(-scores)
    hits = store.similarity_search_with_score(QUERY, k=3)
    assert [doc.metadata["i"] for doc, _ in hits] == expected[:3].tolist()
    assert_close([s for _, s in hits], scores[expected[:3]])  # InMemoryVectorStore scores by cosine


def test_model_directory_and_options(model, model_dir) -> None:
    emb = MMEmbedEmbeddings(model_dir, truncate_dim=16)  # mmembed.load options
    assert_close(emb.embed_documents(DOCS[:2]), model.encode_document(texts=DOCS[:2], truncate_dim=16))
    options = {"normalize_embeddings": True, "truncate_dim": 8}
    emb = MMEmbedEmbeddings(model, encode_kwargs=options)
    assert_close(emb.embed_query(QUERY), model.encode_query(texts=[QUERY], **options)[0])
    with pytest.raises(ValueError, match="float32"):
        MMEmbedEmbeddings(model, encode_kwargs={"precision": "int8"})
    with pytest.raises(TypeError, match="load options"):
        MMEmbedEmbeddings(model, device="cpu")
    with pytest.raises(TypeError, match="model directory"):
        MMEmbedEmbeddings(42)
    with pytest.raises(TypeError, match="list of strings"):
        MMEmbedEmbeddings(model).embed(texts="abc")
