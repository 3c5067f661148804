"""mmembed.adapters.llama_index with llama-index-core installed: the MultiModalEmbedding equals the model's own
encode_query / encode_document for text and images, and VectorStoreIndex / MultiModalVectorStoreIndex retrieval
over it ranks as mmembed does, offline."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from llama_index.core import VectorStoreIndex
from llama_index.core.embeddings import MultiModalEmbedding
from llama_index.core.indices.multi_modal import MultiModalVectorStoreIndex
from llama_index.core.schema import ImageNode, TextNode

from mmembed.adapters.llama_index import MMEmbedMultiModalEmbedding
from tests.adapters.conftest import assert_close
from tests.conftest import make_image

DOCS = ["a red circle on the left", "two blue squares", "a green triangle at the top", "a cat on a mat", "x y z"]
QUERY = "which shape is blue?"


@pytest.fixture
def image_files(tmp_path):
    imgs = [make_image(20 + i, size=(40 + 8 * i, 48)) for i in range(4)]
    paths = []
    for i, img in enumerate(imgs):
        paths.append(str(tmp_path / f"{i}.png"))
        img.save(paths[-1])
    return imgs, paths


def test_text_embeddings_equal_encode(model) -> None:
    emb = MMEmbedMultiModalEmbedding(model, embed_batch_size=2)
    assert isinstance(emb, MultiModalEmbedding) and emb.model is model
    assert emb.model_name == "mmembed" and emb.class_name() == "MMEmbedMultiModalEmbedding"
    q = emb.get_query_embedding(QUERY)
    assert isinstance(q, list) and isinstance(q[0], float)
    assert_close(q, model.encode_query(texts=[QUERY])[0])
    assert_close(emb.get_text_embedding(DOCS[0]), model.encode_document(texts=DOCS[:1])[0])
    docs = model.encode_document(texts=DOCS)
    assert_close(emb.get_text_embedding_batch(DOCS), docs)  # batches of embed_batch_size
    assert np.abs(np.asarray(q) - np.asarray(emb.get_text_embedding(QUERY))).max() > 1e-3  # roles differ
    assert_close(asyncio.run(emb.aget_query_embedding(QUERY)), q)
    assert_close(asyncio.run(emb.aget_text_embedding_batch(DOCS)), docs)
    assert "encode_kwargs" in emb.to_dict()  # the pydantic model serializes; the mmembed model is private


def test_image_embeddings_equal_encode(model, image_files) -> None:
    imgs, paths = image_files
    emb = MMEmbedMultiModalEmbedding(model)
    expected = model.encode_document(images=imgs)
    assert_close(emb.get_image_embedding(paths[0]), expected[0])
    buf = io.BytesIO()
    imgs[1].save(buf, format="PNG")
    assert_close(emb.get_image_embedding(buf), expected[1])  # LlamaIndex's ImageType: a path or a BytesIO
    assert_close(emb.get_image_embedding_batch(paths), expected)
    assert_close(asyncio.run(emb.aget_image_embedding(paths[2])), expected[2])
    assert_close(asyncio.run(emb.aget_image_embedding_batch(paths)), expected)
    assert_close(emb.get_image_query_embedding(paths[3]), model.encode_query(images=imgs[3:])[0])
    rows = emb.embed(texts=["what is this?", None], images=[imgs[0], [imgs[1], imgs[2]]], role="query")
    assert_close(rows, model.encode_query(texts=["what is this?", None], images=[imgs[0], [imgs[1], imgs[2]]]))


def test_vector_store_index_retrieval_ranks_as_mmembed(model) -> None:
    nodes = [TextNode(text=t, id_=f"n{i}") for i, t in enumerate(DOCS)]
    index = VectorStoreIndex(nodes, embed_model=MMEmbedMultiModalEmbedding(model))
    hits = index.as_retriever(similarity_top_k=3).retrieve(QUERY)
    scores = model.similarity(model.encode_query(texts=[QUERY]), model.encode_document(texts=DOCS))[0]
    expected = np.argsort(-scores)[:3]
    assert [h.node.node_id for h in hits] == [f"n{i}" for i in expected]
    assert_close([h.score for h in hits], scores[expected])


def test_multimodal_index_image_retrieval(model, image_files) -> None:
    """Image nodes embedded with the image path (get_image_embedding_batch): an image finds itself first, a text
    query ranks the images as mmembed does."""
    imgs, paths = image_files
    emb = MMEmbedMultiModalEmbedding(model)
    nodes = [ImageNode(image_path=p, text=f"picture {i}", id_=f"img{i}") for i, p in enumerate(paths)]
    index = MultiModalVectorStoreIndex(nodes, embed_model=emb, image_embed_model=emb)
    retriever = index.as_retriever(similarity_top_k=1, image_similarity_top_k=4)
    assert retriever.image_to_image_retrieve(paths[2])[0].node.node_id == "img2"
    hits = retriever.text_to_image_retrieve(QUERY)
    scores = model.similarity(model.encode_query(texts=[QUERY]), model.encode_document(images=imgs))[0]
    assert [h.node.node_id for h in hits] == [f"img{i}" for i in np.argsort(-scores)]


def test_model_directory_and_options(model, model_dir) -> None:
    emb = MMEmbedMultiModalEmbedding(model_dir, load_kwargs={"truncate_dim": 16})
    assert emb.model_name == "mmembed/tiny-mm"
    assert_close(emb.get_query_embedding(QUERY), model.encode_query(texts=[QUERY], truncate_dim=16)[0])
    emb = MMEmbedMultiModalEmbedding(model, encode_kwargs={"truncate_dim": 8}, model_name="acme/tiny")
    assert emb.model_name == "acme/tiny" and len(emb.get_text_embedding(DOCS[0])) == 8
    with pytest.raises(ValueError, match="float32"):
        MMEmbedMultiModalEmbedding(model, encode_kwargs={"precision": "binary"})
    with pytest.raises(TypeError, match="load options"):
        MMEmbedMultiModalEmbedding(model, load_kwargs={"dtype": "bfloat16"})
