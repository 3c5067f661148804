"""mmembed.adapters.mteb with mteb 2.x installed: the EncoderProtocol, the batches mteb's DataLoader yields, prompt
mapping, ModelMeta, and whole ``mteb.evaluate`` runs over retrieval tasks defined from in-memory data (no hub)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from datasets import Dataset
from mteb import evaluate
from mteb._create_dataloaders import create_dataloader
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.models.models_protocols import EncoderProtocol
from mteb.types import PromptType

from mmembed.adapters.mteb import MMEmbedEncoder, fingerprint, model_meta
from tests.adapters.conftest import PROMPTS, assert_close
from tests.conftest import make_image

QUERIES = ["a red circle on the left", "two blue squares", "what color is the triangle?"]
TITLES = ["Shapes", "", "Colors"]
BODIES = ["a large red circle", "blue squares in a row", "a green triangle"]


def _metadata(name: str, category: str, modalities: list[str], prompt: Any = None) -> TaskMetadata:
    meta = TaskMetadata(
        name=name,
        description="An in-memory retrieval task of the mmembed adapter tests.",
        reference="https://github.com/embeddings-benchmark/mteb",
        dataset={"path": "NA", "revision": "NA"},
        type="Any2AnyRetrieval" if modalities != ["text"] else "Retrieval",
        category=category,
        eval_splits=["test"],
        eval_langs=["eng-Latn"],
        main_score="ndcg_at_10",
        date=("2026-01-01", "2026-01-01"),
        dialect=[],
        domains=[],
        task_subtypes=[],
        license="cc-by-4.0",
        annotations_creators="derived",
        sample_creation="found",
        bibtex_citation="",
        prompt=prompt,
    )
    meta.modalities = modalities
    return meta


def make_task(name: str, category: str, queries: dict[str, list], corpus: dict[str, list], qrels: dict) -> Any:
    """A retrieval task whose data is ``queries`` / ``corpus`` columns (``id`` plus ``text`` and/or ``image``)."""
    modalities = sorted({k for part in (queries, corpus) for k in part if k in ("text", "image")}, reverse=True)

    class InMemoryRetrieval(AbsTaskRetrieval):
        metadata = _metadata(name, category, modalities)

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            split = RetrievalSplitData(
                queries=Dataset.from_dict(queries),
                corpus=Dataset.from_dict(corpus),
                relevant_docs=qrels,
                top_ranked=None,
            )
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    return InMemoryRetrieval()


def _score(encoder: MMEmbedEncoder, task: Any) -> float:
    result = evaluate(encoder, task, cache=None, show_progress_bar=False, encode_kwargs={"batch_size": 2})
    return result.task_results[0].get_score()


def test_protocol_and_model_meta(model) -> None:
    enc = MMEmbedEncoder(model, model_name="acme/tiny")
    assert isinstance(enc, EncoderProtocol)  # mteb's runtime-checkable protocol
    meta = enc.mteb_model_meta
    assert isinstance(meta, ModelMeta) and meta.name == "acme/tiny"
    assert meta.embed_dim == model.embed_dim and meta.modalities == ["text", "image"]
    assert meta.similarity_fn_name is ScoringFunction.COSINE
    assert meta.n_parameters == sum(p.numel() for p in model.parameters())
    assert meta.max_tokens == model.cfg.max_length and meta.use_instructions is True
    assert meta.revision == fingerprint(model)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1.0
    assert fingerprint(model) != meta.revision  # other weights, another results folder
    assert model_meta(model, revision="v1", languages=["eng-Latn"]).languages == ["eng-Latn"]
    narrow = MMEmbedEncoder(model, embed_dim=8)  # Matryoshka width for this encoder; the model itself unchanged
    assert narrow.mteb_model_meta.embed_dim == 8 and model.truncate_dim is None
    kw = dict(task_metadata=None, hf_split="test", hf_subset="default")
    assert_close(narrow.encode([{"text": QUERIES}], **kw), model.encode(texts=QUERIES, truncate_dim=8))
    with pytest.raises(TypeError, match="load options"):
        MMEmbedEncoder(model, dtype="bfloat16")


def test_encode_maps_prompt_types_on_mtebs_dataloader(model) -> None:
    """Queries -> encode_query, corpus (title and body joined by mteb) -> encode_document, no type -> encode."""
    enc = MMEmbedEncoder(model)
    meta = _metadata("AdapterT2T", "t2t", ["text"])
    queries = Dataset.from_dict({"id": ["q0", "q1", "q2"], "text": QUERIES})
    corpus = Dataset.from_dict({"id": ["d0", "d1", "d2"], "title": TITLES, "text": BODIES})
    kw = dict(task_metadata=meta, hf_split="test", hf_subset="default")
    q_loader = create_dataloader(queries, task_metadata=meta, prompt_type=PromptType.query, batch_size=2)
    d_loader = create_dataloader(corpus, task_metadata=meta, prompt_type=PromptType.document, batch_size=2)
    q = enc.encode(q_loader, prompt_type=PromptType.query, **kw)
    d = enc.encode(d_loader, prompt_type=PromptType.document, **kw)
    s = enc.encode(create_dataloader(queries, task_metadata=meta, batch_size=2), **kw)
    joined = [f"{t} {b}".strip() for t, b in zip(TITLES, BODIES)]
    assert_close(q, model.encode_query(texts=QUERIES))
    assert_close(d, model.encode_document(texts=joined))
    assert_close(s, model.encode(texts=QUERIES))
    assert np.abs(q - s).max() > 1e-3  # the query prompt applied
    assert_close(enc.similarity(q, d), model.similarity(q, d))
    assert isinstance(enc.similarity(q, d), torch.Tensor)
    assert_close(enc.similarity_pairwise(q, d), model.similarity_pairwise(q, d))
    model.similarity_fn_name = "euclidean"
    assert_close(enc.similarity(q, d), -torch.cdist(torch.from_numpy(q), torch.from_numpy(d)))


def test_encode_image_and_interleaved_batches(model) -> None:
    """``image`` columns (PIL from ``datasets``, pixel tensors, multi-image rows) next to or without ``text``."""
    enc = MMEmbedEncoder(model)
    imgs = [make_image(i, size=(40 + 8 * i, 48)) for i in range(3)]
    meta = _metadata("AdapterIT2I", "it2i", ["text", "image"])  # queries text + image, documents images
    kw = dict(task_metadata=meta, hf_split="test", hf_subset="default")
    ds = Dataset.from_dict({"id": ["q0", "q1", "q2"], "text": QUERIES, "image": imgs})
    loader = create_dataloader(ds, task_metadata=meta, prompt_type=PromptType.query, batch_size=2)
    assert set(next(iter(loader))) >= {"text", "image"}
    assert_close(enc.encode(loader, prompt_type=PromptType.query, **kw), model.encode_query(texts=QUERIES, images=imgs))
    img_only = Dataset.from_dict({"id": ["d0", "d1", "d2"], "image": imgs})
    loader = create_dataloader(img_only, task_metadata=meta, prompt_type=PromptType.document, batch_size=2)
    assert_close(enc.encode(loader, prompt_type=PromptType.document, **kw), model.encode_document(images=imgs))
    tensors = [torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in imgs]  # (C, H, W) uint8
    batches = [{"text": ["", "x"], "image": tensors[:2]}, {"text": [QUERIES[2]], "image": [[tensors[2], tensors[0]]]}]
    expected = model.encode(texts=[None, "x", QUERIES[2]], images=[imgs[0], imgs[1], [imgs[2], imgs[0]]])
    assert_close(enc.encode(batches, **kw), expected)
    with pytest.raises(ValueError, match="no 'text' or 'image'"):
        enc.encode([{"audio": [np.zeros(4)]}], **kw)


def test_model_prompts_and_task_prompts(model) -> None:
    meta = _metadata("AdapterPrompted", "t2t", ["text"], prompt={"query": "Retrieve the shape:"})
    kw = dict(task_metadata=meta, hf_split="test", hf_subset="default")
    batches = [{"text": QUERIES}]
    enc = MMEmbedEncoder(model, model_prompts={"AdapterPrompted-query": "Find it:", "Retrieval": "Any retrieval:"})
    assert_close(enc.encode(batches, prompt_type="query", **kw), model.encode(texts=QUERIES, prompt="Find it:"))
    assert_close(  # task type beats the saved 'document' prompt, as in mteb's lookup order
        enc.encode(batches, prompt_type=PromptType.document, **kw), model.encode(texts=QUERIES, prompt="Any retrieval:")
    )
    task_prompted = MMEmbedEncoder(model, use_task_prompts=True)
    assert_close(
        task_prompted.encode(batches, prompt_type=PromptType.query, **kw),
        model.encode(texts=QUERIES, prompt="Retrieve the shape:"),
    )
    assert_close(  # the task has no document prompt: the model's own applies
        task_prompted.encode(batches, prompt_type=PromptType.document, **kw),
        model.encode(texts=QUERIES, prompt=PROMPTS["document"]),
    )


def test_evaluate_in_memory_tasks_end_to_end(model) -> None:
    """Whole ``mteb.evaluate`` runs. Without prompts every query equals its relevant document, so a correct
    adapter (right rows, right order, right similarity) ranks it first: nDCG@10 = 1 exactly."""
    model.cfg.prompts = {}
    enc = MMEmbedEncoder(model)
    imgs = [make_image(10 + i, size=(40, 40 + 8 * i)) for i in range(4)]
    ids = [f"d{i}" for i in range(4)]
    qids = [f"q{i}" for i in range(4)]
    qrels = {q: {d: 1} for q, d in zip(qids, ids)}
    texts = QUERIES + ["a yellow star"]
    t2t = make_task("AdapterT2T", "t2t", {"id": qids, "text": texts}, {"id": ids, "text": texts}, qrels)
    rows = {"text": texts, "image": imgs}
    it2it = make_task("AdapterIT2IT", "it2it", {"id": qids, **rows}, {"id": ids, **rows}, qrels)
    for task in (t2t, it2it):
        assert _score(enc, task) == pytest.approx(1.0), task.metadata.name
    model.cfg.prompts = dict(PROMPTS)  # with prompts the score is whatever the random model gives, but it runs
    t2i = make_task("AdapterT2I", "t2i", {"id": qids, "text": texts}, {"id": ids, "image": imgs}, qrels)
    assert 0.0 <= _score(MMEmbedEncoder(model), t2i) <= 1.0


def test_model_directory_and_meta_loader(model, model_dir) -> None:
    enc = MMEmbedEncoder(model_dir, embed_dim=16)
    meta = enc.mteb_model_meta
    assert meta.name == "mmembed/tiny-mm" and meta.embed_dim == 16
    batches = [{"text": QUERIES}]
    kw = dict(task_metadata=_metadata("AdapterDir", "t2t", ["text"]), hf_split="test", hf_subset="default")
    assert_close(enc.encode(batches, prompt_type="query", **kw), model.encode_query(texts=QUERIES, truncate_dim=16))
    reloaded = meta.load_model()  # mteb's own loader path: loader(name, revision=..., **loader_kwargs)
    assert isinstance(reloaded, MMEmbedEncoder) and reloaded.mteb_model_meta.name == meta.name
    assert_close(reloaded.encode(batches, prompt_type="document", **kw), model.encode_document(texts=QUERIES))
